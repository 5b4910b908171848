#!/usr/bin/env bash
# Every GPU check of issue 15 in one run of at most 9.5 minutes (each part has its own limit, so one
# that hangs costs only its own figures); the output goes to the terminal and to $OUT/gpu_check.txt
# (default: benchmarks/gpu_check.txt). Run from the repository root:
#   bash benchmarks/gpu_check.sh
# It uses the project's .venv where there is one. The device tool's lent machine has none, and no
# Ray, Optuna or MLflow: there it unpacks .gpu/site.tar.xz, which `python benchmarks/gpu_pack.py`
# builds beforehand where pip reaches PyPI (about 4 minutes), and the run carries: run(carry=[".gpu"], timeout_s=600,
# command="bash benchmarks/gpu_check.sh").
set -u
out=${OUT:-benchmarks}/gpu_check.txt
if [ -x .venv/bin/python ]; then
  PY=${PY:-.venv/bin/python}
elif [ -f .gpu/site.tar.xz ]; then
  mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  PY=${PY:-python3}
  built=$(cat /tmp/site/PYTHON_VERSION) here=$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  if [ "$built" != "$here" ]; then
    echo ".gpu/site.tar.xz holds Python $built's packages, $PY here is $here: python benchmarks/gpu_pack.py --python $here" >&2
    exit 2
  fi
else
  echo "no .venv and no .gpu/site.tar.xz here: run 'python benchmarks/gpu_pack.py' first" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
section() { echo; echo "=== $* ($(date +%T))"; }
{
  section "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"
  section "[cuda] tests"
  timeout 120 $PY -m pytest -q -rs -p no:cacheprovider -k cuda tests/test_arbnet.py tests/test_spin.py \
    tests/test_training.py tests/test_precision.py tests/test_batched_paths.py tests/test_metrics.py 2>&1 | tail -15
  section "bench_arbnet (ArbNet / dense twin; target <= 1.10)"
  timeout 45 $PY benchmarks/bench_arbnet.py --seconds 4
  section "bench_spin (shared <= 1.02, fusion in training <= 1.10)"
  timeout 60 $PY benchmarks/bench_spin.py --seconds 6
  section "bench_train (bf16 against fp32)"
  timeout 100 $PY benchmarks/bench_train.py --seconds 8 --precision bf16
  section "two-worker DDP trial and four packed trials, through the search"
  timeout 130 $PY benchmarks/gpu_trials.py
  section "packing: 1, 2, 4, 8 ArbNet MNIST trials on one GPU"
  timeout 100 $PY benchmarks/bench_packing.py --seconds 5 --warmup 2
  section "done"
} 2>&1 | tee "$out"
