#!/usr/bin/env bash
# Installs what building, running and testing Nudge needs on a fresh Debian machine with Rust.
# Idempotent: a second run takes a few seconds. Everything lands in .tools/ (git-ignored)
# except the one Debian package, which bindgen needs to build LightGBM's bindings.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: libclang for bindgen (LightGBM's bindings), and venv support for
# Debian's own python3 (a python3 that already has ensurepip needs nothing).
missing=()
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi

# LightGBM 4.7's CMake build needs CMake >= 3.28; Debian 12 ships 3.25.
[ -x .tools/venv/bin/python ] || python3 -m venv .tools/venv
.tools/venv/bin/pip install -q --disable-pip-version-check "cmake==4.4.5"

# ONNX Runtime's shared library, loaded at run time by `ort` (load-dynamic).
if [ ! -f .tools/ort/onnxruntime/capi/libonnxruntime.so.1.31.1 ]; then
  .tools/venv/bin/pip install -q --disable-pip-version-check --upgrade --no-deps \
    --target .tools/ort "onnxruntime==1.31.1"
fi
