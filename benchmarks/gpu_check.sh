#!/usr/bin/env bash
# For a lent GPU machine (device tool): build in place with the device's own
# torch, run the whole test suite (CUDA tests included), compute-sanitizer
# memcheck and racecheck over every op, then the benchmarks at GPU sizes; print
# a short table. Exits non-zero when any step fails, after printing it all.
# Budget: under 8 minutes on an H100.
#   bash benchmarks/gpu_check.sh            (PYTHON=python3, OSF_BENCH_WORLD=8)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/osf_gpu_check}; mkdir -p "$OUT"
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
if [[ ${STATUS[build]} == pass* ]]; then
  $PY -m opensora_fast info
  tests() {  # in 8 workers when pytest-xdist is there: faster, and a crash fails one test, not the run
    local par=(); $PY -c "import xdist" 2> /dev/null && par=(-n 8)
    $PY -m pytest -q -rfE "${par[@]}" tests -p no:cacheprovider -m "not slow or cuda" > "$OUT/tests.log" 2>&1; local rc=$?
    grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -40; tail -1 "$OUT/tests.log"; return $rc
  }
  step tests tests
  if command -v compute-sanitizer > /dev/null; then
    san() { PYTHONPATH=. timeout ${OSF_SANITIZE_TIMEOUT:-100} compute-sanitizer --tool "$1" --error-exitcode 9 $PY benchmarks/diagnostics/sanitize_ops.py > "$OUT/$1.log" 2>&1; local rc=$?; tail -3 "$OUT/$1.log"; return $rc; }
    step memcheck san memcheck
    step racecheck san racecheck
  else
    STATUS[memcheck]="FAIL (no compute-sanitizer)"
  fi
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
for k in build tests memcheck racecheck bench; do
  printf '%-10s %s\n' "$k" "${STATUS[$k]:-not run}"
  [[ ${STATUS[$k]:-not run} == pass* ]] || rc=1
done
exit $rc
