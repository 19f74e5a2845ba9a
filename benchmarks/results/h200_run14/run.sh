#!/usr/bin/env bash
# H200 run 14, one call: the host time of a plain overlap-suppression call (host_overhead.py),
# the overlap-suppression benchmark without torch.compile, then every GPU test but DALI's.
# Carry .whl (the project's wheels the machine lacks, benchmarks/gpu_checks.sh). On a fresh machine
# the GPU tests need more than their 240 s here (call 1 was cut after 39 passed; call 2, on the warm
# machine, ran them in 157 s).
set -u
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== [$name] start $(date -u +%T) (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    echo "=== [$name] exit $? after $((SECONDS - start))s"
}
OUT=$OUT/setup CHECKS="none" bash benchmarks/gpu_checks.sh   # environment and wheels to /tmp/site
export PYTHONPATH="$PWD:/tmp/src:/tmp/site"
PYTHONPATH="/tmp/peft:$PYTHONPATH" python3 -c "from peft import LoraConfig" 2>/dev/null \
    && export PYTHONPATH="/tmp/peft:$PYTHONPATH"
step "host time of one call" 90 python3 benchmarks/results/h200_run14/host_overhead.py 2>&1 | tee "$OUT/host.log"
step "overlap benchmark" 200 python3 benchmarks/bench_kernels.py --only suppress_overlap --no-compile \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
step "GPU tests" 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu -rA \
    --ignore tests/gpu/test_pipeline_gpu.py --ignore tests/gpu/test_train_gpu.py \
    --deselect tests/gpu/test_bench_memory_gpu.py::test_benchmark_on_cuda 2>&1 | tee "$OUT/gpu_tests.log"
