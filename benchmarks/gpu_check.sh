#!/usr/bin/env bash
# For a lent GPU machine (see DEVELOPERS.md, device tool): build in place with the
# device's own torch, run the whole test suite (CUDA tests included) and the
# benchmarks at GPU sizes, print a short table. Budget: under 8 minutes.
#   bash benchmarks/gpu_check.sh            (PYTHON=python3, OSF_BENCH_WORLD=8)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/osf_gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
t0=$(date +%s)
$PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
$PY -m opensora_fast info
$PY -m pytest -q tests -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -15
OSF_BENCH_DEVICE=cuda OSF_BENCH_WORLD=${OSF_BENCH_WORLD:-8} OSF_BENCH_ROUNDS=${OSF_BENCH_ROUNDS:-20} \
  $PY -m pytest -q benchmarks -o python_files='bench_*.py' -p no:cacheprovider \
  --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" | sed -n '/^opensora_fast benchmarks/,/^x base/p'
echo "total: $(( $(date +%s) - t0 )) s"
