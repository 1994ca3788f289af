#!/usr/bin/env python3
"""An off-the-shelf client: Python grpcio that discovers Nudge's API through gRPC server
reflection (no generated code, no .proto files), tracks a browsing session and scores the
person. CI runs it against the real binary; it is also the README's example.

    .tools/pyenv/bin/python tests/python_client.py 127.0.0.1:50051
"""
import sys
import time

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICE = "nudge.v1.NudgeService"


def main(address):
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=30)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)

    def rpc(name, request_json):
        method = service.methods_by_name[name]
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            f"/{SERVICE}/{name}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        response = call(json_format.ParseDict(request_json, request_type()), timeout=10)
        return json_format.MessageToDict(response)

    now = time.time()
    stamp = lambda offset: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + offset))
    tracked = rpc("Track", {"events": [
        {"eventId": "py-1", "userId": "python-client", "type": "EVENT_TYPE_PRODUCT_VIEW",
         "eventTime": stamp(-120), "properties": {"productId": "sku-1", "category": "shoes",
                                                  "price": 59.0, "dwellSeconds": 45}},
        {"eventId": "py-2", "userId": "python-client", "type": "EVENT_TYPE_ADD_TO_CART",
         "eventTime": stamp(-60), "properties": {"productId": "sku-1", "price": 59.0, "quantity": 1}},
        {"eventId": "py-3", "userId": "python-client", "type": "EVENT_TYPE_PRODUCT_VIEW",
         "eventTime": stamp(3 * 86400)},
    ]})
    print("Track:", tracked)
    statuses = [r["status"] for r in tracked["results"]]
    assert statuses == ["EVENT_STATUS_ACCEPTED", "EVENT_STATUS_ACCEPTED", "EVENT_STATUS_REJECTED"], statuses
    assert tracked["results"][2]["error"]["field"] == "events[2].event_time"

    scored = rpc("Score", {"person": {"userId": "python-client"}})
    print("Score:", scored)
    scores = {s["model"]: s["probability"] for s in scored["rows"][0]["scores"]}
    assert set(scores) == {"purchase", "churn"}, scores
    assert all(0.0 <= p <= 1.0 for p in scores.values()), scores
    after_cart = {s["model"]: s["probability"] for s in tracked["results"][1]["scores"]}
    assert after_cart.keys() == scores.keys()

    profile = rpc("GetProfile", {"person": {"userId": "python-client"}})
    features = {f["name"]: f.get("value", 0.0) for f in profile["features"]}
    assert features["cart_items"] == 1.0 and features["cart_value"] == 59.0, features
    # Invalid UTF-8 in a string field (Event.user_id): a clear INVALID_ARGUMENT, not a crash.
    raw = channel.unary_unary(f"/{SERVICE}/Track", request_serializer=bytes,
                              response_deserializer=bytes)
    bad_event = b"\x12\x02\xff\xfe"  # field 2 (user_id), 2 bytes, not UTF-8
    try:
        raw(b"\x0a" + bytes([len(bad_event)]) + bad_event, timeout=10)
        raise AssertionError("invalid UTF-8 was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert "user_id" in e.details(), e.details()
        print("invalid UTF-8:", e.code(), e.details())
    print("python client: OK")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051")
