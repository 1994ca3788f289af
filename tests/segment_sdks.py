"""Sends track, page and identify calls to Nudge's HTTP API through the real Segment and
RudderStack Python SDKs (segment-analytics-python, rudder-sdk-python; pinned in
tests/fixtures/requirements.txt), each with its defaults: batching on a background thread,
RudderStack's gzip. Run by tests/integration/segment.rs, which then reads the profiles
over gRPC.

usage: segment_sdks.py HTTP_ORIGIN WRITE_KEY RUN_ID

For each SDK NAME it sends, as person NAME-RUN_ID-user (a visitor NAME-RUN_ID-anon until
the identify): Product Viewed (sku-1, 10.0), a page, identify (a login), Order Completed
(revenue 25), and exits 1 if the SDK reported any error.
"""

import sys

from rudderstack.analytics.client import Client as RudderClient
from segment.analytics.client import Client as SegmentClient


def send(name, client_class, host, write_key, run_id):
    errors = []
    client = client_class(
        write_key=write_key,
        host=host,
        on_error=lambda error, batch: errors.append(repr(error)),
        max_retries=2,
    )
    anon, user = f"{name}-{run_id}-anon", f"{name}-{run_id}-user"
    client.track(
        anonymous_id=anon,
        event="Product Viewed",
        properties={"product_id": "sku-1", "price": 10.0, "category": "Games"},
    )
    client.page(anonymous_id=anon, name="Home", properties={"path": "/"})
    client.identify(user_id=user, anonymous_id=anon, traits={"plan": "pro"})
    client.track(
        user_id=user,
        event="Order Completed",
        properties={"order_id": f"{name}-order", "revenue": 25.0, "total": 27.5},
    )
    # Waits until the queue is delivered (or given up on), then stops the thread.
    client.flush()
    client.shutdown()
    return errors


def main():
    host, write_key, run_id = sys.argv[1:4]
    failed = False
    for name, client_class in [("segment", SegmentClient), ("rudder", RudderClient)]:
        errors = send(name, client_class, host, write_key, run_id)
        for error in errors:
            print(f"{name}: {error}", file=sys.stderr)
        failed |= bool(errors)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
