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
cargo test --release --test fuzz --no-run
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo test --release --test fuzz -q -- --list 2>/dev/null | awk '{print $1}')
fi
if [ "${NUDGE_FUZZ_SEED:-}" = random ]; then
  # One seed for every target's process, printed so the pass can be replayed.
  NUDGE_FUZZ_SEED=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
fi
export NUDGE_FUZZ_SEED=${NUDGE_FUZZ_SEED:-}
echo "fuzz seed: ${NUDGE_FUZZ_SEED:-the fixed default} (NUDGE_FUZZ_SEED)"
printf '%-18s %10s %9s %10s  result\n' target cases seconds cases/s
failed=()
for target in "${targets[@]}"; do
  status=0
  NUDGE_FUZZ_CASES="$cases" cargo test --release --test fuzz -q -- "$target" 2>&1 |
    grep -v -e '^fuzz: ' -e '^target ' -e '^fuzz seed ' || status=$?
  [ "$status" -eq 0 ] || failed+=("$target")
done
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed${failed:+ (${failed[*]})}"
[ ${#failed[@]} -eq 0 ]
