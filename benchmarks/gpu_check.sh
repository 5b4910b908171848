#!/usr/bin/env bash
# Every GPU check of issue 15 in one run (about 10 minutes on one GPU); the output goes to the terminal
# and to $OUT/gpu_check.txt (default: benchmarks/gpu_check.txt). Run from the repository root:
#   bash benchmarks/gpu_check.sh
set -u
PY=${PY:-.venv/bin/python}
out=${OUT:-benchmarks}/gpu_check.txt
section() { echo; echo "=== $* ($(date +%T))"; }
{
  section "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
  section "[cuda] tests"
  timeout 240 $PY -m pytest -q -rs -k cuda tests/test_arbnet.py tests/test_spin.py tests/test_training.py \
    tests/test_precision.py tests/test_batched_paths.py tests/test_metrics.py 2>&1 | tail -15
  section "bench_arbnet (ArbNet / dense twin; target <= 1.10)"
  timeout 90 $PY benchmarks/bench_arbnet.py --seconds 5
  section "bench_spin (shared <= 1.02, fusion in training <= 1.10)"
  timeout 90 $PY benchmarks/bench_spin.py --seconds 8
  section "bench_train (bf16 against fp32)"
  timeout 120 $PY benchmarks/bench_train.py --seconds 10 --precision bf16
  section "two-worker DDP trial and four packed trials, through the search"
  timeout 200 $PY benchmarks/gpu_trials.py
  section "packing: 1, 2, 4, 8 ArbNet MNIST trials on one GPU"
  timeout 240 $PY benchmarks/bench_packing.py --seconds 10 --warmup 3
} 2>&1 | tee "$out"
