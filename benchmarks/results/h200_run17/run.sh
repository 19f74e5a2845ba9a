#!/usr/bin/env bash
# H200 run 17, one call, nothing carried: ab.py (direct launches against Triton's JIT dispatch).
set -u
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
mkdir -p /tmp/src && ln -sfn "$PWD/kernels" /tmp/src/resam_kernels
PYTHONPATH="$PWD:/tmp/src" PYTHONUNBUFFERED=1 timeout --kill-after=5 150 \
    python3 benchmarks/results/h200_run17/ab.py 2>&1 | tee "$OUT/ab.log"
