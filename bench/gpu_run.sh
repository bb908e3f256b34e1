#!/usr/bin/env bash
# The one GPU run: preflight, build (sm_90a), focused GPU tests, headline timings, sanitizer.
#
#   bash bench/gpu_run.sh              # on the GPU machine; everything lands in $OUT
#   bash bench/gpu_run.sh --dry-run    # the whole script on a CPU: tiny shapes, Triton
#                                      # interpreter, build and sanitizer skipped
#
# Every stage writes its own log under $OUT (default bench/results/gpu-run-<date>) and runs under
# `timeout`; a failed or timed-out stage never stops the next one. The whole run keeps inside
# CDLM_FAST_RUN_BUDGET_S seconds (default 450: an 8-minute call with a margin): a stage gets at
# most what is left after the reserve of the stages behind it. $OUT/summary.txt lists every
# stage with its exit status (124: timed out) and seconds; $OUT/headline.json holds the
# timings (also copied to bench/results/<device>-<date>-<commit>.json). See bench/GPU.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${CDLM_FAST_GPU_DRY_RUN:-0}
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-python3}"
BUDGET=${CDLM_FAST_RUN_BUDGET_S:-450}
START=$(date +%s)
if [ "$DRY" = 1 ]; then
  BUDGET=${CDLM_FAST_RUN_BUDGET_S:-3600}  # the dry run checks the script, not the time
  OUT="${OUT:-$(mktemp -d)}"
  export TRITON_INTERPRET=1 CDLM_FAST_GPU_DRY_RUN=1 CUDA_VISIBLE_DEVICES=""
  TIME_BOX=60
else
  OUT="${OUT:-bench/results/gpu-run-$(date -u +%Y%m%d-%H%M%S)}"
  TIME_BOX=${CDLM_FAST_TEST_TIME_BOX_S:-40}
fi
DRY_FLAG=""
[ "$DRY" = 1 ] && DRY_FLAG=--dry-run
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT PY DRY DRY_FLAG
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:$ROOT/bench${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
printf '%-34s %4s %6s\n' stage rc secs > "$SUMMARY"

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME LIMIT_S RESERVE_S CMD...: run CMD with stdout+stderr in $OUT/NAME.log, under
# `timeout` of min(LIMIT_S, time left - RESERVE_S); never fails the script.
stage() {
  local name=$1 limit=$2 reserve=$3; shift 3
  local avail=$(( $(left) - reserve ))
  [ "$avail" -lt "$limit" ] && limit=$avail
  if [ "$limit" -lt 5 ]; then
    echo "skipped: no time left" > "$OUT/$name.log"
    printf '%-34s %4s %6s\n' "$name" skip 0 >> "$SUMMARY"
    echo "=== $name: skipped (no time left)"
    return 0
  fi
  echo "=== $name (limit ${limit}s)"
  local t0=$(date +%s) rc=0
  # bash -c: CMD may be one of the functions below (exported), which `timeout` cannot run itself
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  printf '%-34s %4s %6s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$SUMMARY"
  tail -n 4 "$OUT/$name.log" | sed 's/^/    /'
  return 0
}

# ------------------------------------------------------------------ 1. preflight (seconds)
preflight() {
  echo "date: $(date -u +%FT%TZ)  commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)  dry_run: $DRY"
  for tool in nvidia-smi nvcc ninja compute-sanitizer; do
    printf '%-18s %s\n' "$tool" "$(command -v "$tool" || echo MISSING)"
  done
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -2
  command -v ninja >/dev/null && echo "ninja $(ninja --version)"
  "$PY" - <<'PY'
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "transformers", "pytest", "scipy", "numpy", "cutlass_library", "gguf"):
    try:
        print(f"{m:16s}", getattr(importlib.import_module(m), "__version__", "present"))
    except Exception as e:
        print(f"{m:16s} MISSING ({e.__class__.__name__})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm_count", p.multi_processor_count, f"cc {p.major}.{p.minor}",
          f"{p.total_memory / 2**30:.0f} GiB", "smem_optin", getattr(p, "shared_memory_per_block_optin", "?"))
PY
  "$PY" bench/gpu_headline.py --only peaks --out "$OUT/peaks.json" $DRY_FLAG \
    && "$PY" -c "import json,sys; print('peaks', json.load(open(sys.argv[1]))['peaks'])" "$OUT/peaks.json"
}
export -f preflight
# Run from the source tree, not an install: `cdlm_fast.kernels` is the top-level kernels/ (setup.py
# maps it for installs), so where it does not import, link it where the import looks for it.
if ! "$PY" -c "import cdlm_fast.kernels" 2>/dev/null && [ ! -e cdlm_fast/kernels ]; then
  ln -s ../kernels cdlm_fast/kernels && echo "linked cdlm_fast/kernels -> ../kernels"
fi
stage preflight 60 300 preflight

# ------------------------------------------------------------------ 2. build (sm_90a only)
build() {
  if ! "$PY" -c "import setuptools" 2>/dev/null; then  # torch.utils.cpp_extension needs it
    "$PY" -m pip install -q --no-index --find-links .whl --target /tmp/cdlm_site setuptools wheel \
      && export PYTHONPATH="/tmp/cdlm_site:$PYTHONPATH" && echo "setuptools from .whl/"
  fi
  if ! "$PY" -c "import cutlass_library" 2>/dev/null && [ -z "${CUTLASS_INCLUDE:-}" ]; then
    local whl
    whl=$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -1)
    if [ -n "$whl" ]; then
      "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$whl" /tmp/cdlm_cutlass
      export CUTLASS_INCLUDE=/tmp/cdlm_cutlass/cutlass_library/source/include
      echo "CUTLASS headers from $whl"
    else
      echo "no nvidia-cutlass: neither importable nor a wheel in .whl/ (see bench/GPU.md)"
    fi
  fi
  CDLM_FAST_BUILD_CUDA=1 CDLM_FAST_CUDA_ARCHS="${CDLM_FAST_CUDA_ARCHS:-90a}" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" setup.py -q build_ext --inplace || return 1  # MAX_JOBS: 12 while phase A tests run
  "$PY" -c "import cdlm_fast._C, torch; print('built:', cdlm_fast._C.__file__); \
assert torch.ops.cdlm_fast.layout_selfcheck() == '', 'layout self-check failed'"
}
export -f build

# ------------------------------------------------------------------ 3. focused GPU tests
# Phase A (Triton and torch only) runs while the extension builds in the background (the build
# has MAX_JOBS cores, Triton's compiler the rest); phase B (the CUDA backend) after the build.
# name | per-file limit (s) | pytest arguments
# (dry run: the same files, a tiny -k selection, generous limits: a busy CPU runs the interpreter)
if [ "$DRY" = 1 ]; then
  TESTS_A=(
    "attention_triton|240|tests/test_attention.py -k (edge_cases_use_a_dtype or all_keys_masked_by_bias) and not cuda"
    "gram_triton|240|tests/test_gram.py -k triton_writes_every_element and 37"
    "student|240|tests/test_student.py -k triton_backend_matches_torch_backend"
  )
  TESTS_B=(
    "cuda_extension|240|tests/test_cuda_extension.py -k supports_reasons"
    "attention_cuda|240|tests/test_attention.py -k cuda_backend_on_cpu_tensors"
    "gram_cuda|240|tests/test_gram.py -k auto_order"
    "solvers|240|tests/test_solvers.py -k lstsq_gpu_matches_torch and triton"
  )
else
  TESTS_A=(
    "attention_triton|150|tests/test_attention.py -k not cuda"
    "gram_triton|50|tests/test_gram.py -k not cuda"
    "student|40|tests/test_student.py -k triton_backend_matches_torch_backend"
  )
  TESTS_B=(
    "cuda_extension|45|tests/test_cuda_extension.py"
    "attention_cuda|60|tests/test_attention.py -k cuda"
    "gram_cuda|30|tests/test_gram.py -k cuda"
    "solvers|50|tests/test_solvers.py -k gpu or cuda or triton"
  )
fi
run_tests() {  # entries of the form above; each file its own stage, log and JUnit XML
  local entry name limit args file rest kexpr
  for entry in "$@"; do
    IFS='|' read -r name limit args <<< "$entry"
    file=${args%% *}
    rest=${args#"$file"}
    kexpr=""
    [[ "$rest" == " -k "* ]] && kexpr=${rest# -k }
    stage "test_$name" "$limit" 150 "$PY" -m pytest "$file" ${kexpr:+-k "$kexpr"} -v -rA -p no:cacheprovider \
      -p pytest_time_box --time-box="$TIME_BOX" --junitxml="$OUT/test_$name.xml"
  done
}

if [ "$DRY" = 1 ]; then
  echo "dry run: build skipped" > "$OUT/build.log"; printf '%-34s %4s %6s\n' build skip 0 >> "$SUMMARY"
  run_tests "${TESTS_A[@]}"
else
  MAX_JOBS="${MAX_JOBS:-12}" stage build 240 170 build &
  build_pid=$!
  run_tests "${TESTS_A[@]}"
  wait "$build_pid"
fi
run_tests "${TESTS_B[@]}"

# ------------------------------------------------------------------ 4. headline timings (one JSON)
# the Triton kernels' default configs (autotuning compiles and times ~8 configs per shape bucket:
# a minute of this call); CDLM_FAST_AUTOTUNE=1 to include it
CDLM_FAST_AUTOTUNE=${CDLM_FAST_AUTOTUNE:-0} stage headline 200 25 "$PY" bench/gpu_headline.py --out "$OUT/headline.json" --deadline $(( START + BUDGET - 35 )) \
  $DRY_FLAG
if [ -f "$OUT/headline.json" ]; then
  named=$("$PY" - "$OUT/headline.json" <<'PY'
import json, re, sys
m = json.load(open(sys.argv[1]))["meta"]
slug = re.sub(r"[^A-Za-z0-9]+", "-", m["device"]).strip("-").lower()
print(f"{slug}-{m['date_utc'][:10]}-{(m.get('commit') or 'nocommit')[:10]}{'-dryrun' if m['dry_run'] else ''}.json")
PY
)
  cp "$OUT/headline.json" "$OUT/$named"
  [ "$DRY" = 1 ] || cp "$OUT/headline.json" "bench/results/$named"
  echo "results: $OUT/$named"
fi

# ------------------------------------------------------------------ 5. compute-sanitizer, if present and time left
if [ "$DRY" = 1 ] || ! command -v compute-sanitizer >/dev/null 2>&1; then
  echo "compute-sanitizer: $([ "$DRY" = 1 ] && echo 'dry run' || echo 'not found'): skipped" > "$OUT/sanitizer.log"
  printf '%-34s %4s %6s\n' sanitizer skip 0 >> "$SUMMARY"
else
  for tool in memcheck racecheck; do
    stage "sanitizer_$tool" 90 5 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 "$PY" -m pytest tests/test_cuda_extension.py -q -x -p no:cacheprovider -k "gpu and not opcheck"
  done
fi

# ------------------------------------------------------------------ summary
{
  echo
  echo "total $(( $(date +%s) - START )) s of a ${BUDGET} s budget; logs in $OUT"
  for x in "$OUT"/test_*.xml; do
    [ -f "$x" ] || continue
    "$PY" - "$x" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(f"{sys.argv[1].rsplit('/', 1)[-1]:28s} tests {s.get('tests')} failures {s.get('failures')} "
      f"errors {s.get('errors')} skipped {s.get('skipped')}")
PY
  done
} >> "$SUMMARY"
cat "$SUMMARY"
