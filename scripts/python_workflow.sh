#!/usr/bin/env bash
# The Python workflow end to end (run by scripts/test.sh): simulate events, train the
# purchase model in Rust, export the point-in-time table, train the same model in Python
# LightGBM on it, write its manifest with `nudge manifest`, load it with every serving
# check, score it through the running server, and require its test AUC to be within 0.01
# of the Rust-trained model's on the same test rows.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"; [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true' EXIT
train=target/release/nudge-train
nudge=target/release/nudge
py=.tools/pyenv/bin/python

$train simulate --people 1500 --days 90 --seed 7 --out "$work/events.jsonl"
$train train --events "$work/events.jsonl" --derive purchase --out "$work/rust" --model-version rust-1 >/dev/null
$train export --events "$work/events.jsonl" --derive purchase --out "$work/table.csv"
mkdir -p "$work/python"
$py tests/python_workflow.py "$work/table.csv" "$work/python/purchase-py-1.txt"
$nudge manifest --model "$work/python/purchase-py-1.txt" --name purchase --version py-1 \
  --predicts "purchase within the next 24 hours (trained in Python)"
$nudge check-models "$work/python"

# `tee -a`: opening /dev/stderr without append truncates a log file that stderr points at
# (CI's), wiping everything the test command printed before.
auc() { $train evaluate --table "$work/table.csv" --manifest "$1" | tee -a /dev/stderr | sed -E 's/.*ROC AUC ([0-9.]+).*/\1/'; }
rust_auc=$(auc "$work/rust/purchase.manifest.toml")
python_auc=$(auc "$work/python/purchase.manifest.toml")
python3 -c "import sys; d=abs($rust_auc-$python_auc); print(f'AUC Rust {$rust_auc:.4f}, Python {$python_auc:.4f}, difference {d:.4f}'); sys.exit(0 if d < 0.01 else 1)"

# Served: the running server loads the Python model and scores with it.
port=$($py -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
NUDGE__STORE__DIR="$work/data" NUDGE__MODELS__DIR="$work/python" $nudge serve \
  --grpc-addr "127.0.0.1:$port" --metrics-addr 127.0.0.1:0 2>"$work/serve.log" &
server=$!
$py - "$port" <<'PY'
import sys, grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
channel = grpc.insecure_channel(f"127.0.0.1:{sys.argv[1]}")
grpc.channel_ready_future(channel).result(timeout=30)
pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
m = pool.FindServiceByName("nudge.v1.NudgeService").methods_by_name["Score"]
req, resp = (message_factory.GetMessageClass(t) for t in (m.input_type, m.output_type))
call = channel.unary_unary("/nudge.v1.NudgeService/Score", request_serializer=req.SerializeToString, response_deserializer=resp.FromString)
answer = json_format.MessageToDict(call(json_format.ParseDict({"featureRows": {"rows": [{"values": {"cart_value": 80.0, "session_cart_adds": 1}}]}}, req()), timeout=10))
score = answer["rows"][0]["scores"][0]
assert score["model"] == "purchase" and score["version"] == "py-1" and 0 <= score["probability"] <= 1, answer
print("served:", score)
PY
kill -TERM "$server"; wait "$server"; server=
echo "python workflow: OK"
