#!/usr/bin/env bash
# One prepared device call for the next lent GPU (stop 34): the "drop" overlap-suppression
# experiment of finish orderings and balanced places (overlap_finish_balance.py), then the overlap
# GPU tests of the product (its `_finish_image` now calls `_finish_image_of`: the same operations,
# sm_90 PTX equal but for where %nctaid.x is read). Carry .whl/ (gpu_checks.sh installs the GPU
# tests' dependencies from it).
#   OUT=/some/folder bash benchmarks/experiments/run_overlap_finish_balance.sh
set -u
OUT=${OUT:-benchmarks/experiments/out}
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
mkdir -p /tmp/src && ln -sfn "$PWD/kernels" /tmp/src/resam_kernels
export PYTHONPATH="$PWD:/tmp/src"
timeout 300 python3 benchmarks/experiments/overlap_finish_balance.py "$OUT" 2>&1 | tee "$OUT/finish_balance.log"
experiment=${PIPESTATUS[0]}
echo "=== experiment exit $experiment after ${SECONDS}s"
# (run 19 call 5: 14 overlap GPU tests in 123.8 s)
OUT="$OUT/checks" CHECKS="tests" GPU_TEST_K="overlap" GPU_TEST_LIMIT=200 bash benchmarks/gpu_checks.sh
checks=$?
echo "=== done after ${SECONDS}s (experiment $experiment, checks $checks)"
[ "$experiment" -eq 0 ] && [ "$checks" -eq 0 ]
