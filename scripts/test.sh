#!/usr/bin/env bash
# Runs every check CI runs: formatting, clippy, the Rust tests (unit and integration, over
# real gRPC with real LightGBM and ONNX Runtime), and an off-the-shelf Python gRPC client
# against the real binary. Installs what it needs first (scripts/setup.sh).
#
# Everything builds with the release profile: LightGBM's C++ build is slow and runs once
# per cargo profile, so tests, clippy, the server and the benchmark share one build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -x .tools/pyenv/bin/python ] || python3 -m venv .tools/pyenv
.tools/pyenv/bin/pip install -q --disable-pip-version-check -r tests/fixtures/requirements.txt

# buf lint holds the proto to the Google API design guide (STANDARD + COMMENTS rules).
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q npm
fi
[ -x .tools/buf/node_modules/.bin/buf ] ||
  npm install --silent --no-audit --no-fund --prefix .tools/buf @bufbuild/buf@1.75.0
(cd proto && ../.tools/buf/node_modules/.bin/buf lint)

cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace

# The Python client, through reflection, against the real binary with the shipped models.
port=$(.tools/pyenv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mport=$(.tools/pyenv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
data=$(mktemp -d)
NUDGE__STORE__DIR="$data" target/release/nudge serve --grpc-addr "127.0.0.1:$port" \
  --metrics-addr "127.0.0.1:$mport" 2>nudge-client-check.log &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
.tools/pyenv/bin/python tests/python_client.py "127.0.0.1:$port"
kill -TERM $server
wait $server
trap - EXIT
rm -rf nudge-client-check.log "$data"

# A model trained in Python on the exported table is served, and scores like the Rust one.
bash scripts/python_workflow.sh
echo "all checks passed"
