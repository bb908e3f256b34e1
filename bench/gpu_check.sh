#!/usr/bin/env bash
# Full GPU validation in one run, for a bare CUDA machine with no network:
#   1. build the CUDA extension against the torch that is installed (CUTLASS headers from an
#      nvidia-cutlass wheel in ./.whl if `cutlass_library` is not importable);
#   2. run the whole test suite on the GPU (Triton and CUDA backends);
#   3. compute-sanitizer memcheck + racecheck on the small GPU cases of every CUDA kernel
#      (tests/test_cuda_extension.py -k gpu);
#   4. measure copy bandwidth and bf16 matmul peak, then run every benchmark suite.
# Everything lands in $OUT_DIR (default: bench/results/gpu-<date>).
#
#   bash bench/gpu_check.sh [OUT_DIR]
#   STEPS="build tests" bash bench/gpu_check.sh OUT_DIR     # a subset, e.g. one step per call
#
# STEPS (default: all of "build tests sanitizer bench"); a later step needs the build of an
# earlier call in the same working tree.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
status=0
STEPS="${STEPS:-build tests sanitizer bench}"
step() { echo; echo "=== $*"; }
want() { [[ " $STEPS " == *" $1 "* ]]; }

if ! "$PY" -c "import cutlass_library" 2>/dev/null && ls .whl/nvidia_cutlass-*.whl >/dev/null 2>&1; then
  step "installing CUTLASS headers from .whl/"
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/cdlm_site .whl/nvidia_cutlass-*.whl
  export CUTLASS_INCLUDE=$(echo /tmp/cdlm_site/cutlass_library/source/include)
fi

if want build; then
  step "build and editable install, offline (sm_${CDLM_FAST_CUDA_ARCHS:-80;90a})"
  ( time CDLM_FAST_BUILD_CUDA=1 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . ) \
    > "$OUT_DIR/build.log" 2>&1 || { tail -50 "$OUT_DIR/build.log"; exit 1; }
  tail -3 "$OUT_DIR/build.log"
fi

step "environment"
"$PY" -m cdlm_fast env | tee "$OUT_DIR/env.txt"
"$PY" -m cdlm_fast env --json > "$OUT_DIR/env.json"

if want tests; then
  step "tests on the GPU"
  "$PY" -m pytest tests -q --junitxml="$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.log" | tail -30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

if ! want sanitizer; then
  :
elif command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" -m pytest tests/test_cuda_extension.py -q -x -k gpu \
      > "$OUT_DIR/sanitizer-$tool.log" 2>&1 || { status=1; tail -30 "$OUT_DIR/sanitizer-$tool.log"; }
    tail -3 "$OUT_DIR/sanitizer-$tool.log"
  done
else
  echo "compute-sanitizer not found: skipped" | tee "$OUT_DIR/sanitizer.log"
fi

if want bench; then
  step "benchmarks"
  "$PY" -m cdlm_fast bench all --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
