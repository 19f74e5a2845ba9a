#!/usr/bin/env bash
# H200 run 18 (stop 31), one call carrying .whl: every word-kernel config of "drop" overlap
# suppression and the extra candidates (bench_overlap_configs.py); the extras that beat the tuned
# configs by 1% or more join _WORD_CONFIGS in this copy of the tree (adopt_best.py, diff in
# $OUT/adopted.diff); then the kernel benchmark of overlap suppression (both modes, the autotuner's
# picks) and the overlap GPU tests on that code, in the time left under MAX_S.
set -u
MAX_S=${MAX_S:-555}
KERNELS_LIMIT=110
mkdir -p "$OUT"
OUT="$OUT" CHECKS=overlap_configs OVERLAP_CONFIGS_LIMIT=200 bash benchmarks/gpu_checks.sh
python3 benchmarks/results/h200_run18/adopt_best.py "$OUT/overlap_configs/overlap_configs.json" \
    kernels/overlap.py "$OUT/adopted.diff" 2>&1 | tee -a "$OUT/gpu_checks.log"
tests_limit=$((MAX_S - SECONDS - KERNELS_LIMIT - 15))
echo "=== overlap GPU tests get ${tests_limit}s" | tee -a "$OUT/gpu_checks.log"
OUT="$OUT" CHECKS="kernels tests" KERNEL_CASES=suppress_overlap KERNELS_LIMIT=$KERNELS_LIMIT \
    GPU_TEST_K=overlap GPU_TEST_LIMIT=$tests_limit bash benchmarks/gpu_checks.sh
echo "=== run.sh done after ${SECONDS}s"
