#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, its own Python with a CUDA build of torch (2.11 or
# 2.14), nvcc, cmake, ninja, pybind11 and scikit-build-core, and no network, run from the source
# tree's root:
#
#     bash scripts/gpu_check.sh
#
# Steps, in this order, each under a time cap so that the whole run ends inside GPU_CHECK_BUDGET_S
# (default 470 s, about 8 minutes):
#   1. build     in place without build isolation (scripts/build_inplace.sh, CUDA required, the
#                local GPU's architecture only)
#   2. tests     pytest on tests/ (the device-parametrized tests run on cuda as well as cpu)
#   3. bench_mvp benchmarks/bench_mvp.py --device cuda --preset a --preset c (the GPU targets:
#                (a) against the loop and torch.func at D = 256, (c) against its GEMMs alone)
#   4. bench_pack benchmarks/bench_pack.py --device cuda (when the script exists)
#   5. memcheck  compute-sanitizer --tool memcheck over the cuda cases of the native-op tests
#                (tests/ops/test_*.py, tests/torch/engines/test_native_engine.py), if
#                time remains and the machine lets compute-sanitizer run (a refusal is recorded)
# Everything goes to one folder, $OUT if set, else ./gpu_check_out: summary.md (the table printed
# last, with the machine, torch, CUDA, commit and build_info), build.log, tests.log, bench_mvp.log,
# bench_pack.log, memcheck.log, and bench_mvp.md / bench_pack.md (the benchmarks' markdown tables,
# when a benchmark takes --out): 8 files at most. The exit status is 0 when no step failed (skipped
# steps do not fail the run), 1 otherwise, 2 when there is no usable GPU.
#
#   PYTHON=python3              the interpreter with torch
#   GPU_CHECK_BUDGET_S=470      seconds for the whole run
#   GPU_CHECK_ARCHS=90-real     architectures to compile (default: the GPU's compute capability)
#   GPU_CHECK_COMMIT=abc1234    the commit to name in the summary when the tree has no .git
#   CAP_BUILD=240 CAP_TESTS=180 CAP_BENCH=150 (mvp) / 75 (pack) CAP_MEMCHECK=150   step caps, seconds
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUTDIR"
BUDGET=${GPU_CHECK_BUDGET_S:-470}
SECONDS=0
rows=()
failed=0

# Seconds a step may take: its cap, less what the budget has left (minus 10 s for the summary).
cap_for() {
  local left=$((BUDGET - SECONDS - 10))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# row NAME STATUS SECONDS DETAIL
row() { rows+=("| $1 | $2 | $3 | $4 |"); case "$2" in FAILED*|TIMEOUT*) failed=1 ;; esac; }

# timed NAME CAP LOG CMD...: runs CMD under `timeout`, output to LOG; sets rc and took.
timed() {
  local name=$1 cap=$2 log=$3; shift 3
  local t0=$SECONDS
  echo "== [$name] (cap ${cap}s) $*"
  timeout --kill-after=10 "$cap" "$@" >"$log" 2>&1
  rc=$?
  took=$((SECONDS - t0))
  tail -n 5 "$log" | sed "s/^/   [$name] /"
}

summary() {
  local commit
  commit=${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no .git; set GPU_CHECK_COMMIT)")}
  {
    echo "# twicediff GPU check"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); commit: $commit"
    echo "- GPU: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo none)"
    echo "- $("$PY" --version 2>&1); torch $("$PY" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null); nvcc $(nvcc --version 2>/dev/null | grep -o "release [0-9.]*" | cut -d" " -f2 || echo missing)"
    echo "- build_info: $(PYTHONPATH=python "$PY" -c 'import json, twicediff; print(json.dumps(twicediff.build_info()))' 2>/dev/null || echo 'twicediff does not import')"
    echo "- total: ${SECONDS}s of a ${BUDGET}s budget; logs beside this file"
    echo
    echo "| step | status | seconds | detail |"
    echo "| --- | --- | --- | --- |"
    printf '%s\n' "${rows[@]}"
  } >"$OUTDIR/summary.md"
  echo
  cat "$OUTDIR/summary.md"
}

# ---- 0. is there a GPU torch can use? ----------------------------------------------------------
gpu=$("$PY" -c 'import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
major, minor = torch.cuda.get_device_capability()
print(f"{major}{minor}")' 2>&1)
if [ $? -ne 0 ]; then
  row "gpu" "FAILED" "$SECONDS" "no usable GPU: $(echo "$gpu" | tail -n 1)"
  for s in build tests bench_mvp bench_pack memcheck; do row "$s" "skipped" 0 "no GPU"; done
  summary
  exit 2
fi
ARCHS=${GPU_CHECK_ARCHS:-$(echo "$gpu" | tail -n 1)-real}

# ---- 1. build ------------------------------------------------------------------------------------
timed build "$(cap_for "${CAP_BUILD:-240}")" "$OUTDIR/build.log" \
  env PYTHON="$PY" JOBS="$(nproc)" BUILD_DIR=build/gpu-check TWICEDIFF_CUDA_ARCHS="$ARCHS" \
  bash scripts/build_inplace.sh -DTWICEDIFF_REQUIRE_CUDA=ON
if [ "$rc" -ne 0 ]; then
  case $rc in 124|137) st=TIMEOUT ;; *) st="FAILED (exit $rc)" ;; esac
  row build "$st" "$took" "archs $ARCHS; see build.log"
  for s in tests bench_mvp bench_pack memcheck; do row "$s" "skipped" 0 "the build failed"; done
  summary
  exit 1
fi
row build ok "$took" "archs $ARCHS, $(grep -c 'Building CUDA object' "$OUTDIR/build.log") .cu files compiled"
export PYTHONPATH=$PWD/python

# ---- 2. tests ------------------------------------------------------------------------------------
rc=0 took=0
junit=$(mktemp /tmp/twicediff-gpu-check-junit.XXXXXX.xml)
timed tests "$(cap_for "${CAP_TESTS:-180}")" "$OUTDIR/tests.log" \
  "$PY" -m pytest tests -q -p no:cacheprovider --durations=10 --junitxml="$junit"
counts=$("$PY" - "$junit" <<'EOF' 2>/dev/null
import re, sys, xml.etree.ElementTree as ET
cases = list(ET.parse(sys.argv[1]).getroot().iter("testcase"))
def outcome(c):
    for tag in ("failure", "error", "skipped"):
        if c.find(tag) is not None:
            return tag
    return "passed"
# the device fixture's parameter id: test_x[cuda], test_x[cuda-float64], test_x[float64-cuda]
on_cuda = [c for c in cases if re.search(r"\[(.*-)?cuda(-.*)?\]$", c.get("name", ""))]
all_ = {k: sum(outcome(c) == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
cuda = {k: sum(outcome(c) == k for c in on_cuda) for k in ("passed", "failure", "error", "skipped")}
print(f"{all_['passed']} passed, {all_['failure']} failed, {all_['error']} errors, {all_['skipped']} "
      f"skipped; of them on cuda: {cuda['passed']} passed, {cuda['failure'] + cuda['error']} failed, "
      f"{cuda['skipped']} skipped")
EOF
)
rm -f "$junit"
case $rc in
  0) row tests ok "$took" "${counts:-see tests.log}" ;;
  124|137) row tests TIMEOUT "$took" "${counts:-see tests.log}" ;;
  *) row tests "FAILED (exit $rc)" "$took" "${counts:-$(tail -n 1 "$OUTDIR/tests.log")}" ;;
esac

# ---- 3, 4. benchmarks ----------------------------------------------------------------------------
for bench in mvp pack; do
  script=benchmarks/bench_$bench.py
  if [ ! -f "$script" ]; then
    row "bench_$bench" skipped 0 "$script does not exist"
    continue
  fi
  cap=$(cap_for "${CAP_BENCH:-$([ "$bench" = mvp ] && echo 150 || echo 75)}")
  if [ "$cap" -lt 20 ]; then row "bench_$bench" skipped 0 "no time left"; continue; fi
  out=() table="bench_$bench.log"
  if grep -q -- '"--out"' "$script"; then out=(--out "$OUTDIR/bench_$bench.md"); table="bench_$bench.md"; fi
  extra=()
  # No untimed calls before each timing: on the GPU, torch's caching allocator keeps one method's
  # frees from costing the next (the host-heap effect they are for), and the cap is tight.
  [ "$bench" = mvp ] && extra=(--preset a --preset c --untimed-first 0)
  timed "bench_$bench" "$cap" "$OUTDIR/bench_$bench.log" "$PY" "$script" --device cuda "${extra[@]}" "${out[@]}"
  case $rc in
    0) row "bench_$bench" ok "$took" "table in $table" ;;
    124|137) row "bench_$bench" TIMEOUT "$took" "partial output in bench_$bench.log" ;;
    *) row "bench_$bench" "FAILED (exit $rc)" "$took" "$(tail -n 1 "$OUTDIR/bench_$bench.log")" ;;
  esac
done

# ---- 5. compute-sanitizer memcheck over the native-op tests --------------------------------------
op_tests=(tests/ops/test_*.py tests/torch/engines/test_native_engine.py)
cap=$(cap_for "${CAP_MEMCHECK:-150}")
existing=()
for t in "${op_tests[@]}"; do [ -e "$t" ] && existing+=("$t"); done
op_tests=("${existing[@]}")
if [ "${#op_tests[@]}" -eq 0 ]; then
  row memcheck skipped 0 "no native-op tests (tests/ops/test_*.py, tests/torch/engines/test_native_engine.py)"
elif ! command -v compute-sanitizer >/dev/null 2>&1; then
  row memcheck skipped 0 "compute-sanitizer is not on PATH"
elif [ "$cap" -lt 60 ]; then
  row memcheck skipped 0 "no time left (${cap}s)"
else
  # Without the caching allocator every tensor is its own allocation, so that memcheck sees its
  # bounds. A first tiny run finds out whether the machine lets compute-sanitizer run at all.
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  timed memcheck-probe "$(cap_for 60)" "$OUTDIR/memcheck.log" \
    compute-sanitizer --tool memcheck --error-exitcode 86 \
    "$PY" -c 'import torch; x = torch.ones(4, device="cuda"); torch.cuda.synchronize(); print("probe ok", float((x * 2).sum()))'
  if [ "$rc" -ne 0 ] || ! grep -q "probe ok" "$OUTDIR/memcheck.log"; then
    row memcheck "refused" "$took" "compute-sanitizer could not run here: $(grep -m1 -iE 'error|not supported' "$OUTDIR/memcheck.log" | tr '|' '/' | cut -c1-160)"
  else
    mv "$OUTDIR/memcheck.log" "$OUTDIR/memcheck-probe.tmp"
    timed memcheck "$(cap_for "$cap")" "$OUTDIR/memcheck.log" \
      compute-sanitizer --tool memcheck --error-exitcode 86 --print-limit 20 \
      "$PY" -m pytest -q -p no:cacheprovider -k cuda "${op_tests[@]}"
    cat "$OUTDIR/memcheck-probe.tmp" >>"$OUTDIR/memcheck.log" && rm -f "$OUTDIR/memcheck-probe.tmp"
    errs=$(grep -m1 -o "ERROR SUMMARY: [0-9]* error[s]*" "$OUTDIR/memcheck.log" || echo "no summary line")
    case $rc in
      0) row memcheck ok "$took" "$errs; $(grep -E '^[0-9]+ (passed|failed)|passed|failed' "$OUTDIR/memcheck.log" | tail -n 1)" ;;
      86) row memcheck "FAILED (memory errors)" "$took" "$errs; see memcheck.log" ;;
      5) row memcheck skipped "$took" "no native-op test has a cuda case" ;;
      124|137) row memcheck TIMEOUT "$took" "partial: $errs" ;;
      *) row memcheck "FAILED (exit $rc)" "$took" "$errs; $(tail -n 1 "$OUTDIR/memcheck.log")" ;;
    esac
  fi
fi

summary
exit "$failed"
