#!/usr/bin/env bash
# Runs the fuzz targets (tests/fuzz, proptest on stable Rust): scripts/fuzz.sh [CASES]
# [TARGET...]. CASES per target (default: each target's short count, the pass
# scripts/test.sh runs); no TARGET: all of them (`scripts/fuzz.sh --list` names them).
# Prints cases, seconds and cases/s per target; exits non-zero if any target failed.
#
# Each target runs in a process of its own, so a crash that no unwinding survives (a
# stack overflow or an abort inside LightGBM or ONNX Runtime) stops only its target; the
# model targets keep the input being tried in $TMPDIR/nudge-fuzz-<target>.last, which
#   target/release/deps/fuzz-* --replay TARGET FILE
# runs again. NUDGE_FUZZ_SEED=random draws a new seed (printed) instead of the fixed one.
#
# The long pass (a million cases per target; about two hours on two cores, niced):
#   nice -n 19 scripts/fuzz.sh 1000000
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .tools/ort/onnxruntime/capi/libonnxruntime.so.1.31.1 ] || bash scripts/setup.sh
cases=""
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
  cases=$1
  shift
fi
if [ "${1:-}" = "--list" ]; then
  exec cargo test --release --test fuzz -- --list
fi
# The binary itself, run directly, so that the heap checks below reach it and not cargo;
# the ONNX Runtime library as .cargo/config.toml names it for cargo's own runs.
bin=$(cargo test --release --test fuzz --no-run 2>&1 | tee /dev/stderr |
  sed -n 's/.*Executable .*(\(.*\))$/\1/p')
[ -x "$bin" ] || { echo "fuzz.sh: no fuzz test binary found" >&2; exit 1; }
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/.tools/ort/onnxruntime/capi/libonnxruntime.so.1.31.1}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <("$bin" --list 2>/dev/null | awk '{print $1}')
fi
if [ "${NUDGE_FUZZ_SEED:-}" = random ]; then
  # One seed for every target's process, printed so the pass can be replayed.
  NUDGE_FUZZ_SEED=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
fi
export NUDGE_FUZZ_SEED=${NUDGE_FUZZ_SEED:-}
echo "fuzz seed: ${NUDGE_FUZZ_SEED:-the fixed default} (NUDGE_FUZZ_SEED)"
# glibc's checking allocator, where it exists (Debian 12's glibc ships it): a write past
# a heap block (LightGBM's or ONNX Runtime's C++ reading a malformed model) aborts at the
# block's free, in the case that did it, instead of corrupting the heap for a later case
# to crash on, where the kept input is not the one to blame. About 25% slower.
checker=/lib/x86_64-linux-gnu/libc_malloc_debug.so.0
check=()
if [ -f "$checker" ] && [ "${NUDGE_FUZZ_MALLOC_CHECK:-1}" != 0 ]; then
  check=(LD_PRELOAD="$checker" GLIBC_TUNABLES=glibc.malloc.check=3)
  echo "heap checks: $checker (NUDGE_FUZZ_MALLOC_CHECK=0 turns them off)"
fi
printf '%-18s %10s %9s %10s  result\n' target cases seconds cases/s
failed=()
for target in "${targets[@]}"; do
  status=0
  env "${check[@]}" NUDGE_FUZZ_CASES="$cases" "$bin" "$target" 2>&1 |
    grep -v -e '^fuzz: ' -e '^target ' -e '^fuzz seed ' || status=$?
  [ "$status" -eq 0 ] || failed+=("$target")
done
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed${failed:+ (${failed[*]})}"
[ ${#failed[@]} -eq 0 ]
