#!/usr/bin/env bash
# H200 run 19, call 1: the ablation of the strip design (ablation.py) and, where the machine has
# Nsight Compute, a profile of the pick. Nothing carried beyond the tree.
set -u
mkdir -p "$OUT"
nvidia-smi -L | tee "$OUT/device.txt"
mkdir -p /tmp/src && ln -sfn "$PWD/kernels" /tmp/src/resam_kernels
export PYTHONPATH="$PWD:/tmp/src"
timeout 240 python3 benchmarks/results/h200_run19/ablation.py "$OUT" 2>&1 | tee "$OUT/ablation.log"
echo "=== ablation done after ${SECONDS}s"
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: ${NCU:-none}"
if [ -n "$NCU" ]; then
    timeout 150 "$NCU" --kernel-name regex:suppress_drop --launch-skip 2 --launch-count 1 --set full \
        python3 benchmarks/results/h200_run19/profile_pick.py > "$OUT/ncu_pick.txt" 2>&1
    echo "ncu exit $? after ${SECONDS}s"; tail -5 "$OUT/ncu_pick.txt"
fi
echo "=== run.sh done after ${SECONDS}s"
