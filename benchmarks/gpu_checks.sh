#!/usr/bin/env bash
# One prepared pass of every GPU check, for a lent GPU machine that has torch, triton and pytest
# but not this project's other dependencies: put their wheels in .whl/ (e.g. `pip download --no-deps
# --only-binary=:all: -d .whl segment-anything==1.0`) and carry that folder; they install to /tmp/site.
#
#   OUT=/some/folder bash benchmarks/gpu_checks.sh
#   OUT=/some/folder CHECKS="profile" bash benchmarks/gpu_checks.sh     # only the named checks
#
# CHECKS (default "memory kernels tests ckpt"): memory = the ViT-B memory benchmark (ReSAM-dist with
# train.activation_checkpointing MEMORY_CHECKPOINTING, default "all"), kernels = bench_kernels.py, tests = pytest -m gpu, ckpt =
# ReSAM-dist with the other checkpointing settings (CKPT_MODES, default "off encoder decoder"),
# profile = ReSAM-dist ("all" and "off", or PROFILE_MODES="on"/"off") under torch.profiler ($OUT/profile*/),
# overlap_configs = every word-kernel config of "drop" overlap suppression, alone and back to back
# ($OUT/overlap_configs/, benchmarks/bench_overlap_configs.py; not in the default CHECKS),
# trace = what is live at ReSAM-dist's memory peak and where it was allocated (checkpointing
# MEMORY_CHECKPOINTING; $OUT/memory_trace/memory_peak_resam_dist.txt, benchmarks/memory_peak.py).
# KERNEL_CASES="suppress_overlap ..." limits the kernel benchmark to those cases, GPU_TEST_K="..." the
# GPU tests to a pytest -k expression; *_LIMIT variables set each step's time limit in seconds, and
# MAX_CALL_S refuses, before anything runs, CHECKS whose limits add up to more (a lent machine's
# 600 s per command fits e.g. CHECKS="tests" or "kernels ckpt" with MAX_CALL_S=570, not the default four).
#
# Each step has its own time limit and a failing step does not stop the next, so one call gives
# as much as it can: the log ($OUT/gpu_checks.log), the kernel benchmark ($OUT/kernels/) and the
# ViT-B memory benchmark ($OUT/memory/, and ReSAM-dist with the other checkpointing settings in
# $OUT/memory_ckpt_<setting>/). The DALI loader and trainer GPU tests need the DALI wheel
# (too large to carry in one call: benchmarks/dali_parts.sh splits it for several calls) and are
# skipped when nvidia.dali is missing.
set -u
OUT=${OUT:-benchmarks/results/gpu_run}
CHECKS=${CHECKS:-memory kernels tests ckpt}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_checks.log") 2>&1
export PYTHONUNBUFFERED=1
REPO=$(pwd)
PY=${PY:-python3}

wanted() { [[ " $CHECKS " == *" $1 "* ]]; }

# each step's time limit in seconds (override with the variable)
MEMORY_LIMIT=${MEMORY_LIMIT:-240}
CKPT_LIMIT=${CKPT_LIMIT:-75}
GPU_TEST_LIMIT=${GPU_TEST_LIMIT:-360}
KERNELS_LIMIT=${KERNELS_LIMIT:-280}
OVERLAP_CONFIGS_LIMIT=${OVERLAP_CONFIGS_LIMIT:-150}
PROFILE_LIMIT=${PROFILE_LIMIT:-90}
TRACE_LIMIT=${TRACE_LIMIT:-120}
CKPT_MODES=${CKPT_MODES:-off encoder decoder}
PROFILE_MODES=${PROFILE_MODES:-on off}
# MAX_CALL_S: the most seconds one call of this script may run (e.g. 570 under a lent machine's
# 600 s per command; 0: no limit). The named checks' step limits must fit in it, else nothing runs.
count() { set -- $1; echo $#; }
for check in $CHECKS; do
    case "$check" in
        memory|kernels|tests|ckpt|profile|overlap_configs|trace) ;;
        *) echo "error: unknown check '$check' in CHECKS (known: memory kernels tests ckpt profile overlap_configs trace)"
           exit 2 ;;
    esac
done
for mode in $PROFILE_MODES; do
    [[ $mode == on || $mode == off ]] || { echo "error: PROFILE_MODES takes on and off, got '$mode'"; exit 2; }
done
if ! [[ ${MAX_CALL_S:-0} =~ ^[0-9]+$ ]]; then
    echo "error: MAX_CALL_S must be a whole number of seconds, got '$MAX_CALL_S'"
    exit 2
fi
budget=0
wanted memory && budget=$((budget + MEMORY_LIMIT))
wanted ckpt && budget=$((budget + CKPT_LIMIT * $(count "$CKPT_MODES")))
wanted tests && budget=$((budget + GPU_TEST_LIMIT))
wanted kernels && budget=$((budget + KERNELS_LIMIT))
wanted overlap_configs && budget=$((budget + OVERLAP_CONFIGS_LIMIT))
wanted profile && budget=$((budget + PROFILE_LIMIT * $(count "$PROFILE_MODES")))
wanted trace && budget=$((budget + TRACE_LIMIT))
if [ "${MAX_CALL_S:-0}" -gt 0 ] && [ "$budget" -gt "${MAX_CALL_S:-0}" ]; then
    echo "error: CHECKS=\"$CHECKS\" may take up to ${budget}s (the sum of their step limits), over" \
         "MAX_CALL_S=$MAX_CALL_S: run them in several calls, or lower their *_LIMIT"
    exit 2
fi

FAILED=()  # the steps that did not exit 0 (the script's exit status is 1 when there are any)
step() {  # step NAME SECONDS COMMAND...: run with a limit, report its status and duration
    local name=$1 limit=$2; shift 2
    local start=$SECONDS rc
    echo "=== [$name] start $(date -u +%T) (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== [$name] exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || FAILED+=("$name (exit $rc)")
    return "$rc"
}

echo "=== environment"
nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $(ls .whl/*.whl | grep -v '/peft-') || echo "wheel install failed"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peft \
        .whl/peft-*.whl 2>/dev/null || true
fi
# DALI, carried in parts over several calls (benchmarks/dali_parts.sh): installed when every part
# is here and they join to the tar that was split
DALI_PARTS=${DALI_PARTS:-.dali}
DALI_UNPACK=${DALI_UNPACK:-/tmp/dali}
if [ -f "$DALI_PARTS/dali.sha256" ]; then
    want=$(cut -d' ' -f1 "$DALI_PARTS/dali.sha256")
    have=$(cat "$DALI_PARTS"/part-* 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$want" = "$have" ]; then
        rm -rf "$DALI_UNPACK" && mkdir -p "$DALI_UNPACK" && cat "$DALI_PARTS"/part-* | tar -x -C "$DALI_UNPACK" \
            && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                "$DALI_UNPACK"/wheels/*.whl && echo "DALI installed from $DALI_PARTS" || echo "DALI install failed"
    else
        echo "DALI not installed: the parts in $DALI_PARTS ($(ls "$DALI_PARTS" | grep -c '^part-') of them) do not" \
             "join to the tar of dali.sha256 (a part not carried yet, or one from another download)"
    fi
fi
mkdir -p /tmp/src && ln -sfn "$REPO/kernels" /tmp/src/resam_kernels
export PYTHONPATH="$REPO:/tmp/src:/tmp/site"
# the pinned peft if it imports against the machine's transformers, else the machine's own
if PYTHONPATH="/tmp/peft:$PYTHONPATH" "$PY" -c "import peft; from peft import LoraConfig, get_peft_model" 2>/dev/null; then
    export PYTHONPATH="/tmp/peft:$PYTHONPATH"
fi
"$PY" - <<'PYEOF'
import importlib
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "bf16", torch.cuda.is_bf16_supported())
for name in ("triton", "peft", "deepspeed", "segment_anything", "webdataset", "pycocotools", "finch",
             "nvidia.dali", "resam_dist", "resam_kernels"):
    try:
        module = importlib.import_module(name)
        print(f"{name:18s} {getattr(module, '__version__', '-')}")
    except Exception as error:
        print(f"{name:18s} MISSING ({type(error).__name__}: {error})")
PYEOF

# order: the memory figures, the GPU tests, the kernel benchmark, the profile
# Measured on an H200 (2026-11-25/26): machine start ~36 s; memory benchmark 90-170 s (PointSAM-style
# alone ~70 s; on a fresh machine ReSAM-dist first compiles its Triton kernels, 30-40 s more),
# kernel benchmark 80-150 s before its autotune spaces grew (autotuning and torch.compile of every
# case), GPU tests (all but DALI's, 2026-11-27): 157 s with Triton's cache warm, over 240 s on a fresh
# machine (run 14), one extra ReSAM-dist run 40-70 s; overlap_configs 44 s and the overlap GPU
# tests 106 s on a fresh machine (run 18). Results are written after every
# variant / case, and ReSAM-dist runs first.
wanted memory && step "memory benchmark (vit_b, 1024 px)" "$MEMORY_LIMIT" "$PY" benchmarks/memory_vs_pointsam.py \
    --model vit_b --instances 50 --images-per-step 4 --steps 10 --warmup 2 --device cuda --out "$OUT/memory" \
    --variants resam_dist,resam_public,pointsam --dist-checkpointing "${MEMORY_CHECKPOINTING:-all}" \
    --note "benchmarks/gpu_checks.sh on a lent machine"
# the trade-off: ReSAM-dist with the other checkpointing settings (charts dropped: fewer files come back)
if wanted ckpt; then
    for mode in $CKPT_MODES; do
        step "memory benchmark, ReSAM-dist, checkpointing $mode" "$CKPT_LIMIT" "$PY" benchmarks/memory_vs_pointsam.py \
            --model vit_b --instances 50 --images-per-step 4 --steps 10 --warmup 2 --device cuda --variants resam_dist \
            --dist-checkpointing "$mode" --out "$OUT/memory_ckpt_$mode" && rm -f "$OUT"/memory_ckpt_$mode/*.png
    done
fi
if wanted tests; then
    IGNORE=()
    "$PY" -c "import nvidia.dali" 2>/dev/null || IGNORE=(--ignore tests/gpu/test_pipeline_gpu.py --ignore tests/gpu/test_train_gpu.py)
    SELECT=(); [[ -n ${GPU_TEST_K:-} ]] && SELECT=(-k "$GPU_TEST_K")  # e.g. GPU_TEST_K="overlap or model"
    step "pytest tests/gpu" "$GPU_TEST_LIMIT" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/gpu "${IGNORE[@]}" \
        --deselect tests/gpu/test_bench_memory_gpu.py::test_benchmark_on_cuda -rA "${SELECT[@]}"
fi
ONLY=(); for case in ${KERNEL_CASES:-}; do ONLY+=(--only "$case"); done  # default: every case
wanted kernels && step "kernel benchmark" "$KERNELS_LIMIT" "$PY" benchmarks/bench_kernels.py --out "$OUT/kernels" "${ONLY[@]}"
wanted overlap_configs && step "word-kernel configs of overlap suppression" "$OVERLAP_CONFIGS_LIMIT" \
    "$PY" benchmarks/bench_overlap_configs.py --out "$OUT/overlap_configs"
if wanted profile; then
    for ckpt in $PROFILE_MODES; do
        extra=(); [[ $ckpt == off ]] && extra=(--dist-checkpointing off)
        step "profile ReSAM-dist, checkpointing $ckpt" "$PROFILE_LIMIT" "$PY" benchmarks/memory_vs_pointsam.py \
            --model vit_b --instances 50 --images-per-step 4 --steps 5 --warmup 2 --device cuda --variants resam_dist \
            "${extra[@]}" --profile "$OUT/profile_ckpt_$ckpt" --out "$OUT/profile_ckpt_$ckpt" && rm -f "$OUT"/profile_ckpt_$ckpt/*.png
    done
fi
wanted trace && step "memory trace of ReSAM-dist" "$TRACE_LIMIT" "$PY" benchmarks/memory_vs_pointsam.py \
    --model vit_b --instances 50 --images-per-step 4 --steps 2 --warmup 2 --device cuda --variants resam_dist \
    --dist-checkpointing "${MEMORY_CHECKPOINTING:-all}" --memory-trace "$OUT/memory_trace" --out "$OUT/memory_trace" \
    && rm -f "$OUT"/memory_trace/*.png
echo "=== done $(date -u +%T)"
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf '=== failed: %s\n' "${FAILED[@]}"
    exit 1
fi
