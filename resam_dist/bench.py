"""resam-bench: run the benchmarks in benchmarks/ (results written to benchmarks/results/).

    resam-bench kernels [ARGS]   Triton kernels vs torch eager and torch.compile (needs CUDA)
    resam-bench loader  [ARGS]   DALI loader images/s vs the images/s the training step consumes
    resam-bench memory  [ARGS]   training memory and images/s: PointSAM-style vs ReSAM vs ReSAM-dist
    resam-bench all              loader and memory; kernels too when CUDA is available

ARGS go to the benchmark script unchanged (`resam-bench memory --help` lists them).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = {"kernels": "bench_kernels.py", "loader": "bench_loader.py", "memory": "memory_vs_pointsam.py"}


def _run(name: str, args: list[str]) -> int:
    script = BENCHMARKS / SCRIPTS[name]
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
    import torch

    names = ["loader", "memory"] + (["kernels"] if torch.cuda.is_available() else [])
    codes = {each: _run(each, []) for each in names}
    print(f"[resam-bench] exit codes: {codes}", flush=True)
    return max(codes.values())
