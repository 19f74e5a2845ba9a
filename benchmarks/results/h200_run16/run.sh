#!/usr/bin/env bash
# H200 run 16, one call: run 15's call (overlap GPU tests, host time of one call, overlap benchmark)
# with benchmarks/results/h200_run15/direct_launch.patch applied, then, if those tests all passed,
# every other GPU test but DALI's. Carry .whl.
set -u
bash benchmarks/results/h200_run15/run.sh
if grep -qE "[0-9]+ passed" <(tail -n 3 "$OUT/gpu_tests.log") && ! grep -qE "[0-9]+ (failed|error)" "$OUT/gpu_tests.log"; then
    export PYTHONPATH="$PWD:/tmp/src:/tmp/site"
    PYTHONPATH="/tmp/peft:$PYTHONPATH" python3 -c "from peft import LoraConfig" 2>/dev/null \
        && export PYTHONPATH="/tmp/peft:$PYTHONPATH"
    echo "=== [other GPU tests] start $(date -u +%T) (limit 330s)"
    timeout --kill-after=10 330 python3 -m pytest -q -m gpu -p no:cacheprovider tests/gpu -rA \
        -k "not suppress_overlap" --ignore tests/gpu/test_pipeline_gpu.py --ignore tests/gpu/test_train_gpu.py \
        --deselect tests/gpu/test_bench_memory_gpu.py::test_benchmark_on_cuda 2>&1 | tee "$OUT/gpu_tests_other.log"
    echo "=== [other GPU tests] exit ${PIPESTATUS[0]}"
else
    echo "=== overlap GPU tests did not all pass: other GPU tests not run"
fi
