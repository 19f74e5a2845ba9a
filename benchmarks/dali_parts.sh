#!/usr/bin/env bash
# DALI for a lent GPU machine, in parts: the machine's image has no DALI, and its wheel and the
# wheels it needs beyond that image (about 257 MB) are over what one call may carry (64 MiB with
# the working tree, about 20 MB of it). This downloads them, tars them and splits the tar into
# parts of PART_MB MB in the folder DALI_PARTS (default .dali/, ignored by git), with the sha256 of
# the whole tar:
#
#   bash benchmarks/dali_parts.sh            # .dali/part-00 ... .dali/part-06, .dali/dali.sha256
#
# Then, on one warm machine (files in an ignored folder survive between calls while it stays
# warm; it goes back after idle_release_s, 30 s on the H200), one call per part but the last, each
# carrying only its part, e.g. carry [".dali/part-00"] with the command `ls -l .dali`; and a last
# call carrying [".whl", ".dali/dali.sha256", ".dali/part-06"] that runs gpu_checks.sh: it checks
# the joined parts against the sha256, installs them into /tmp/site next to .whl's wheels, and the
# DALI pipeline and trainer GPU tests run, e.g.
#
#   MAX_CALL_S=570 OUT=$OUT CHECKS=tests GPU_TEST_K="pipeline or training" bash benchmarks/gpu_checks.sh
set -euo pipefail
PART_MB=${PART_MB:-40}
DALI_PARTS=${DALI_PARTS:-.dali}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# pyproject.toml's DALI and the versions of its needs that the project's environment resolves to
WHEELS=(nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16
        nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 nvidia-nvjpeg==13.3.2.43
        optree==0.20.0 makefun==1.16.0 libcst==1.9.0 nvtx==0.2.17 astunparse==1.6.3 gast==0.7.0)
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                manylinux1_x86_64; do
    PLATFORMS+=(--platform "$platform")
done
rm -rf "$DALI_PARTS"
mkdir -p "$DALI_PARTS/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DALI_PARTS/wheels" "${WHEELS[@]}"
tar -C "$DALI_PARTS" -cf "$DALI_PARTS/dali.tar" wheels
rm -rf "$DALI_PARTS/wheels"
(cd "$DALI_PARTS" && sha256sum dali.tar >dali.sha256 && split -b "${PART_MB}M" -d dali.tar part- && rm dali.tar)
ls -l "$DALI_PARTS"
