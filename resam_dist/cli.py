"""Console scripts. Each command lives in its own module; this file only dispatches."""

from __future__ import annotations

import sys


def prep_main(argv: list[str] | None = None) -> int:
    """resam-prep: COCO JSON + images -> tiled WebDataset shards."""
    from resam_dist.data.shards import main
    return main(sys.argv[1:] if argv is None else argv)


def eval_main(argv: list[str] | None = None) -> int:
    """resam-eval: mIoU/F1/precision/recall and COCO mask AP."""
    from resam_dist.eval.evaluate import main
    return main(sys.argv[1:] if argv is None else argv)


def demo_main(argv: list[str] | None = None) -> int:
    """resam-demo: point-supervised adaptation end to end on synthetic domains."""
    from resam_dist.demo import main
    return main(sys.argv[1:] if argv is None else argv)


def bench_main(argv: list[str] | None = None) -> int:
    """resam-bench: run the benchmarks in benchmarks/ and write benchmarks/results/."""
    from resam_dist.bench import main
    return main(sys.argv[1:] if argv is None else argv)
