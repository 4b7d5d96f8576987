#!/usr/bin/env bash
# For a lent GPU machine (device tool): build in place with the device's own
# torch, check that CUDA and the build's CUDA kernels are there, run the whole
# test suite with OPENSORA_FAST_BACKEND=native (CUDA tests included), then at once:
# the CUDA tests again with the small launch tables forced, and compute-sanitizer
# memcheck (eager ops, graph replays, the staged gather; again with the small
# tables: every plan split), racecheck, synccheck and initcheck; then the
# benchmarks at GPU sizes. Prints a short table. Exits non-zero when any step
# fails, after printing it all.
# Budget on an H100 (16 cores), estimated: build 1-2 min, tests 1.5-2.5 min,
# the parallel phase (small-table tests, five sanitizer runs) 1.5-2.5 min
# (each sanitizer run capped at OSF_SANITIZE_TIMEOUT s), benchmarks and demo 3 min:
# under 10 minutes.
#   bash benchmarks/gpu_check.sh            (PYTHON=python3, OSF_BENCH_WORLD=8)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/osf_gpu_check}; mkdir -p "$OUT"
STEPS=(build cuda tests tests-small memcheck memcheck-small racecheck synccheck initcheck bench)
declare -A STATUS
step() {  # step NAME CMD...: runs, records pass/FAIL, never stops the script
  local name=$1; shift
  local t=$(date +%s)
  if "$@"; then STATUS[$name]="pass ($(( $(date +%s) - t )) s)"; else STATUS[$name]="FAIL ($(( $(date +%s) - t )) s)"; fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
t0=$(date +%s)
build() { $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; return 1; }; }
step build build
# A build without CUDA kernels, or a torch that sees no GPU, would pass the CUDA
# tests through the references or skip them: refuse both.
cuda_ok() {
  $PY -m opensora_fast info
  $PY - << 'EOF'
import torch

import opensora_fast

info = opensora_fast.build_info()
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
assert info["cuda_kernels"] is True, f"the build has no CUDA kernels: {info.get('import_error') or info}"
print("cuda:", torch.cuda.get_device_name(), "sm", torch.cuda.get_device_capability(), "sass", info["cuda_sass"], "ptx", info["cuda_ptx"])
EOF
}
if [[ ${STATUS[build]} == pass* ]]; then
  step cuda cuda_ok
fi
if [[ ${STATUS[cuda]:-} == pass* ]]; then
  export OPENSORA_FAST_BACKEND=native  # the native kernel or an error, never the reference
  export OPENSORA_FAST_TEST_BACKEND=native  # the tests start from it too (tests/conftest.py)
  par=(); $PY -c "import xdist" 2> /dev/null && par=(-n 8)  # a crash then fails one test, not the run
  tests() {  # tests LOG PYTEST-ARGS...
    local log=$1; shift
    $PY -m pytest -q -rfEs "${par[@]}" tests -p no:cacheprovider "$@" > "$OUT/$log" 2>&1; local rc=$?
    grep -E "^(FAILED|ERROR) " "$OUT/$log" | head -40; tail -1 "$OUT/$log"; return $rc
  }
  step tests tests tests.log -m "not slow or cuda"

  # The parallel phase: independent processes, small inputs, one GPU.
  san() {  # san NAME TOOL [VAR=VALUE ...] SECTION...: one compute-sanitizer run, log in $OUT/NAME.log
    local name=$1 tool=$2; shift 2
    local envs=(); while [[ ${1:-} == *=* ]]; do envs+=("$1"); shift; done
    PYTHONPATH=. timeout "${OSF_SANITIZE_TIMEOUT:-150}" env "${envs[@]}" OPENSORA_FAST_BACKEND=native \
      compute-sanitizer --tool "$tool" --error-exitcode 9 $PY benchmarks/diagnostics/sanitize_ops.py "$@" \
      > "$OUT/$name.log" 2>&1
  }
  small_tests() { OPENSORA_FAST_FORCE_SMALL_TABLES=1 tests tests-small.log -m cuda > "$OUT/tests-small.out" 2>&1; }
  declare -A PIDS START
  START[tests-small]=$(date +%s); small_tests & PIDS[tests-small]=$!
  if command -v compute-sanitizer > /dev/null; then
    for spec in "memcheck memcheck ops graphs gather" \
                "memcheck-small memcheck OPENSORA_FAST_FORCE_SMALL_TABLES=1 ops graphs" \
                "racecheck racecheck ops graphs" "synccheck synccheck ops graphs" "initcheck initcheck ops graphs"; do
      read -r -a a <<< "$spec"
      START[${a[0]}]=$(date +%s); san "${a[@]}" & PIDS[${a[0]}]=$!
    done
  else
    for k in memcheck memcheck-small racecheck synccheck initcheck; do STATUS[$k]="FAIL (no compute-sanitizer)"; done
  fi
  for k in tests-small memcheck memcheck-small racecheck synccheck initcheck; do
    [[ -n ${PIDS[$k]:-} ]] || continue
    wait "${PIDS[$k]}"; rc=$?
    s="$(( $(date +%s) - ${START[$k]} )) s"
    if [[ $rc == 0 ]]; then STATUS[$k]="pass ($s)"; elif [[ $rc == 124 ]]; then STATUS[$k]="FAIL (timed out, $s)"; else STATUS[$k]="FAIL (rc $rc, $s)"; fi
  done
  echo "-- CUDA tests with the small tables forced"; cat "$OUT/tests-small.out"
  for k in memcheck memcheck-small racecheck synccheck initcheck; do
    [[ -f $OUT/$k.log ]] && { echo "-- $k"; grep -E "^sanitize_ops|ERROR SUMMARY|RACECHECK SUMMARY|Error|error" "$OUT/$k.log" | tail -6; }
  done

  bench() {  # one process per file, as make bench: each starts from the same process state
    local rc=0 f; : > "$OUT/bench.log"; mkdir -p "$OUT/bench-json"
    for f in benchmarks/bench_*.py; do
      OSF_BENCH_DEVICE=cuda OSF_BENCH_WORLD=${OSF_BENCH_WORLD:-8} OSF_BENCH_ROUNDS=${OSF_BENCH_ROUNDS:-20} \
        $PY -m pytest -q "$f" -o python_files='bench_*.py' -p no:cacheprovider \
        --benchmark-disable-gc --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/bench-json/$(basename "$f" .py).json" \
        >> "$OUT/bench.log" 2>&1 || { rc=1; echo "FAILED: $f"; }
    done
    sed -n '/^checkpoint path on/,/segments, staging=False/p' "$OUT/bench.log"
    sed -n '/^opensora_fast benchmarks/,/^x base/p' "$OUT/bench.log"
    PYTHONPATH=. $PY -m benchmarks.diagnostics.gpu_breakdown || rc=1
    $PY -m benchmarks.collect "$OUT/bench-json" --out "$OUT" || rc=1
    $PY -m opensora_fast demo --size gpu --device cuda --out "$OUT" --no-progress || rc=1
    return $rc
  }
  step bench bench
fi
echo "---- gpu_check summary (total $(( $(date +%s) - t0 )) s)"
rc=0
for k in "${STEPS[@]}"; do
  printf '%-15s %s\n' "$k" "${STATUS[$k]:-not run}"
  [[ ${STATUS[$k]:-not run} == pass* ]] || rc=1
done
# Tests that could not get their memory skip; say so here rather than pass silently.
skips=$(cat "$OUT"/tests.log "$OUT"/tests-small.log 2> /dev/null | grep -E "^SKIPPED .*(memory|GPUs|CUDA devices)" | sort -u)
[[ -n $skips ]] && { echo "skipped for want of memory or devices:"; echo "$skips"; }
exit $rc
