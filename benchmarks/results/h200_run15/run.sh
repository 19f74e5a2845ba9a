#!/usr/bin/env bash
# H200 run 15, one call: the GPU tests of overlap suppression (the direct launches of compiled
# kernels among them), the host time of one call, then the overlap benchmark. Carry .whl. Needs
# direct_launch.patch applied first (host_overhead.py reads overlap._COMPILED): see README.md.
set -u
export PYTHONUNBUFFERED=1
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== [$name] start $(date -u +%T) (limit ${limit}s)"
    timeout --kill-after=5 "$limit" "$@"
    echo "=== [$name] exit $? after $((SECONDS - start))s"
}
OUT=$OUT/setup CHECKS="none" bash benchmarks/gpu_checks.sh
export PYTHONPATH="$PWD:/tmp/src:/tmp/site"
step "GPU tests of overlap suppression" 130 python3 -m pytest -q -p no:cacheprovider -rA \
    tests/gpu/test_kernels_gpu.py -k "suppress_overlap and not 64bit" 2>&1 | tee "$OUT/gpu_tests.log"
step "host time of one call" 60 python3 benchmarks/results/h200_run15/host_overhead.py 2>&1 | tee "$OUT/host.log"
step "overlap benchmark" 100 python3 benchmarks/bench_kernels.py --only suppress_overlap --no-compile \
    --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
