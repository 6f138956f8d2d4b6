#!/usr/bin/env bash
# GPU check (the CUDA part of the benchmarks). Run on a CUDA machine from anywhere:
#   bash scripts/gpu_check.sh            # writes results/gpu_check_<date>/
# 1. tests/test_cuda.py: the loss on CUDA matches CPU (several configs, f32/f64, queue wrap),
#    host syncs per forward+backward are the same for C=2 and C=100, backward does not sync.
# 2. scripts/bench.py on CUDA: C=100 with a 1,000,000-row pool (batch 8192 + queue 991,808),
#    plus the speed cases of docs/benchmarks.md, against the plain reference, GPU named in the output.
# Exits non-zero if there is no CUDA device or a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch (torch.cuda.is_available() is False)" >&2
    exit 2
fi

out="results/gpu_check_$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
{
    echo "date: $(date -u +%FT%TZ)"
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); print('gpu', torch.cuda.get_device_name(0))"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
} | tee "$out/machine.txt"

status=0
python -m pytest tests/test_cuda.py -v -rs -s -p no:cacheprovider 2>&1 | tee "$out/test_cuda.log" || status=1

python scripts/bench.py --device cuda --cases c100_pool1m,c16_q64k,c100_q64k,c1_1m \
    --repeats 10 --json "$out/bench_cuda.json" 2>&1 | tee "$out/bench_cuda.log" || status=1

echo "gpu_check: results in $out (status $status)"
exit "$status"
