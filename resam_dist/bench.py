"""resam-bench: run the benchmarks in benchmarks/ (results written to benchmarks/results/).

    resam-bench kernels [ARGS]   Triton kernels vs torch eager and torch.compile (needs CUDA)
    resam-bench overlap-configs [ARGS]
                                 every launch config of the "drop" overlap-suppression kernel, alone
                                 and back to back (needs CUDA; not part of `all`)
    resam-bench loader  [ARGS]   DALI loader images/s vs the images/s the training step consumes
    resam-bench memory  [ARGS]   training memory and images/s: PointSAM-style vs ReSAM vs ReSAM-dist
    resam-bench all              loader and memory; kernels too when CUDA is available. Without CUDA,
                                 memory runs the tiny SAM (CPU_MEMORY_ARGS: the ViT-B default at
                                 1024 px would need tens of GB and hours on a CPU). Takes no ARGS.

ARGS go to the benchmark script unchanged (`resam-bench memory --help` lists them). The exit status
is the script's; for `all`, the worst (signal N counts as N), 0 only when every benchmark exited 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = {"kernels": "bench_kernels.py", "loader": "bench_loader.py", "memory": "memory_vs_pointsam.py",
           "overlap-configs": "bench_overlap_configs.py"}
CPU_MEMORY_ARGS = ["--model", "tiny", "--instances", "16", "--steps", "5", "--warmup", "1"]
"""`resam-bench all`'s memory benchmark without CUDA: the settings of
benchmarks/results/memory_vs_pointsam_cpu.md."""


def _run(name: str, args: list[str]) -> int:
    script = BENCHMARKS / SCRIPTS[name]
    if not script.is_file():
        print(f"[resam-bench] {script} is missing: the benchmarks run from a checkout of the repository "
              "(pip install -e .)", file=sys.stderr, flush=True)
        return 2
    print(f"[resam-bench] {name}: {script.name} {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, str(script), *args]).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in (*SCRIPTS, "all"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, args = argv[0], argv[1:]
    if name != "all":
        return _run(name, args)
    if args:  # (each benchmark takes its own arguments: run them one by one)
        print(f"[resam-bench] all takes no arguments, got {' '.join(args)}", file=sys.stderr, flush=True)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    runs = {"loader": [], "memory": [] if cuda else CPU_MEMORY_ARGS, **({"kernels": []} if cuda else {})}
    codes = {each: _run(each, each_args) for each, each_args in runs.items()}
    print(f"[resam-bench] exit codes: {codes}", flush=True)
    return max(abs(code) for code in codes.values())  # (a benchmark killed by signal N exits with -N)
