#!/usr/bin/env bash
# Installs what is missing, builds, and starts Nudge with the shipped config and models.
# gRPC on :50051, Prometheus metrics on :9464/metrics. Extra arguments go to `nudge serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --release --bin nudge -- serve --config config/nudge.toml "$@"
