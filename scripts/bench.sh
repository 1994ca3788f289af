#!/usr/bin/env bash
# Scoring benchmark, Nudge beside its peers, in one run on this machine:
#   1. the peers' own benchmark (../shared/peers/bench_gbdt.py bench --models M): Python
#      LightGBM, its single-row fast path, lleaves, treelite/tl2cgen, ONNX Runtime; it also
#      converts model M to ONNX with onnxmltools;
#   2. Nudge's backends on the same model file and that same ONNX conversion, and Track →
#      scores per event with the shipped models (benches/scoring.rs);
#   3. Score over real gRPC on loopback: a Rust load generator against Nudge with the
#      shipped models and against a trivial tonic server of the same service, the ceiling
#      (benches/grpc.rs; NUDGE_BENCH_CHANNELS, NUDGE_BENCH_INFLIGHT, NUDGE_BENCH_SECONDS, ...).
# Output goes to the terminal and bench-out/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PEERS="${NUDGE_BENCH_PEERS:-$(cd ../shared/peers && pwd)}"
mkdir -p bench-out/peer-build
[ -x .tools/peers/bin/python ] || python3 -m venv .tools/peers
.tools/peers/bin/pip install -q --disable-pip-version-check -r bench/requirements-peers.txt

echo "=== peers: bench_gbdt.py bench --models M"
(cd bench-out && ../.tools/peers/bin/python "$PEERS/bench_gbdt.py" bench --models M \
   --build-dir peer-build --reuse-build "$@") | tee bench-out/peers.txt

echo "=== nudge: cargo bench --bench scoring"
NUDGE_BENCH_PEERS="$PEERS" NUDGE_BENCH_ONNX="$PWD/bench-out/peer-build/model_M.onnx" \
  cargo bench --bench scoring | tee bench-out/nudge.txt

echo "=== nudge: cargo bench --bench grpc"
cargo bench --bench grpc | tee bench-out/grpc.txt
