"""Time each launch config of the word kernel ("drop" overlap suppression) at the benchmark's shapes,
or with `--mode argmax` each config of the byte kernel in "argmax" mode.

    python benchmarks/bench_overlap_configs.py [--out DIR] [--extra TILE,STRIP_ROWS,PREFETCH,WARPS[,STREAM] ...]
    python benchmarks/bench_overlap_configs.py --mode argmax [--out DIR]   # overlap_configs_argmax.*
    python benchmarks/bench_overlap_configs.py --cpu-smoke [--out DIR]    # tests this script only

Each config runs alone (`triton.testing.do_bench`, which clears the L2 cache before every call:
what a plain call and the autotuner see) and back to back (`do_bench_cudagraph`: many calls in one
graph), against a copy of the same bytes timed both ways. Every config's outputs and boxes are
checked against the torch reference before it is timed. Candidates: the configs of
`overlap._WORD_CONFIGS` that its pruner lets run on these masks, then the `--extra` strip configs
not among them. The default extras, in the order they run (a run cut short by its time limit keeps
the first), vary the software-pipelined strip (PREFETCH 0, tuned since H200 run 19, whose sweep
adopted its 16-row STREAM variant for 8 x 50 x 256 x 256): 32 rows with STREAM (every store
streaming; the register prefetch's loads are evict-first too, the pipelined loads are cp.async),
8-row strips, and 2 and 8 warps. Run 18's
extras (one-warp strips, wide strips, STREAM on the register prefetch) never beat the tuned
configs at 2 x 50 x 1024 x 1024 (benchmarks/results/h200_run18/).

Writes overlap_configs.json and overlap_configs.md into --out (default benchmarks/results, or
benchmarks/results/smoke with --cpu-smoke) after every row, 1024 x 1024 first. Without CUDA it
refuses (exit code 2) unless `--cpu-smoke`: tiny masks through Triton's interpreter and a
wall-clock timer; those numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench_kernels import compact_masks, copy_bandwidth_gbps, median_call_ms, overlap_bytes

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_EXTRAS = ("2048,32,0,4,1", "2048,8,0,4", "2048,8,0,4,1", "1024,32,0,2", "1024,16,0,2",
                  "4096,32,0,8", "4096,16,0,8")
# B x K x H x W: the kernel benchmark's overlap shapes (K = 50 on the ViT and the tiny canvas)
SHAPES = ((2, 50, 1024, 1024), (8, 50, 256, 256))
SMOKE_SHAPES = ((1, 3, 16, 64),)


def strip_config(text: str):
    """"TILE,STRIP_ROWS,PREFETCH,WARPS[,STREAM]" -> a triton.Config of the word kernel's strip design
    (PREFETCH 0: the row loop software-pipelined by Triton; STREAM 1: streaming stores, and
    evict-first loads with PREFETCH 1-2; default 0). Exits with a message on anything
    the kernel cannot run."""
    import triton
    try:
        tile, strip_rows, prefetch, warps, *rest = (int(part) for part in text.split(","))
    except ValueError:
        rest = [None, None]  # (a message below)
    if len(rest) > 1:
        raise SystemExit(f"bench_overlap_configs: --extra takes TILE,STRIP_ROWS,PREFETCH,WARPS[,STREAM] "
                         f"(4 or 5 integers), got {text!r}")
    stream = rest[0] if rest else 0
    power_of_two = lambda value: value > 0 and value & (value - 1) == 0  # noqa: E731
    if not (power_of_two(tile) and 1 <= strip_rows <= 32 and prefetch in (0, 1, 2) and power_of_two(warps)
            and warps <= 32 and stream in (0, 1)):
        raise SystemExit(f"bench_overlap_configs: --extra {text!r}: TILE and WARPS must be powers of two "
                         "(WARPS <= 32), STRIP_ROWS 1 to 32, PREFETCH 0, 1 or 2, STREAM 0 or 1")
    meta = {"TILE": tile, "STRIP_ROWS": strip_rows, "PREFETCH": prefetch}
    if stream:
        meta["STREAM"] = True
    return triton.Config(meta, num_warps=warps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for overlap_configs.json/.md (default: benchmarks/results, or "
                             "benchmarks/results/smoke with --cpu-smoke)")
    parser.add_argument("--extra", action="append", default=None,
                        help="an extra strip config TILE,STRIP_ROWS,PREFETCH,WARPS[,STREAM] (repeatable; default: "
                             + " ".join(DEFAULT_EXTRAS) + ")")
    parser.add_argument("--mode", choices=("drop", "argmax"), default="drop",
                        help="drop: the word kernel's configs and the extras; argmax: every byte-kernel "
                             "config (masks + float32 confidences; no extras), into overlap_configs_argmax.*")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny masks on CPU through the Triton interpreter (tests the script only)")
    args = parser.parse_args(argv)
    if args.mode == "argmax" and args.extra:
        parser.error("--extra configs are word-kernel strips: mode drop only")
    return args


def describe(config) -> str:
    return f"{config.kwargs} warps={config.num_warps}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:  # smoke numbers never overwrite real results
        args.out = DEFAULT_OUT / "smoke" if args.cpu_smoke else DEFAULT_OUT
    if args.cpu_smoke:  # before any Triton kernel module is imported
        os.environ["TRITON_INTERPRET"] = "1"
    extras = [strip_config(text) for text in (args.extra or DEFAULT_EXTRAS)]
    import torch
    import triton
    import triton.testing

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_overlap_configs: no CUDA device; this benchmark needs a GPU "
              "(use --cpu-smoke only to test this script on CPU)", file=sys.stderr)
        return 2
    from resam_dist.durable import atomic_write_text  # a run killed at its time limit leaves whole files
    from resam_kernels import overlap
    from resam_kernels.entropy import entropy_filter_reference

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    device_name = ("cpu (Triton interpreter, smoke test: numbers are meaningless)" if args.cpu_smoke
                   else torch.cuda.get_device_name(device))
    copy_gbps = copy_bandwidth_gbps(device, wall_clock=args.cpu_smoke)
    print(f"device-to-device copy on {device_name}: {copy_gbps:.1f} GB/s", flush=True)
    result = {"device": device_name, "smoke": args.cpu_smoke, "torch": torch.__version__,
              "triton": triton.__version__, "copy_bandwidth_gbps": copy_gbps, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)

    stem = "overlap_configs" if args.mode == "drop" else "overlap_configs_argmax"
    result["mode"] = args.mode

    def save() -> None:
        atomic_write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(args.out / f"{stem}.md", markdown(result))

    generator = torch.Generator(device=device).manual_seed(0)
    for batch, num_instances, height, width in SMOKE_SHAPES if args.cpu_smoke else SHAPES:
        shape = f"{batch}x{num_instances}x{height}x{width}"
        counts = torch.full((batch,), num_instances, dtype=torch.int64, device=device)
        counts[0] = max(0, num_instances - 7)
        # valid masks (and confidences) in (padding planes are not read), every mask out, boxes out
        num_bytes = overlap_bytes(counts, num_instances, height * width, 1 if args.mode == "drop" else 5)
        source = torch.ones(num_bytes // 8, dtype=torch.int32, device=device)  # a copy of the same bytes
        target = torch.empty_like(source)
        confidence = None  # read in "argmax" mode: the random logits' (as bench_kernels.py does)
        for kind in ("random", "compact"):
            if kind == "random":  # the entropy filter of random logits, as in bench_kernels.py
                logits = torch.randn(batch, num_instances, height, width, device=device, generator=generator) * 4
                masks, random_confidence = entropy_filter_reference(logits, 0.5, return_confidence=True)
                confidence = random_confidence if args.mode == "argmax" else None
                del logits, random_confidence
            else:
                masks = compact_masks(batch, num_instances, height, width, device, generator)
            expected_out, expected_boxes = overlap.suppress_overlap_reference(masks, confidence, counts, args.mode)
            kp = triton.next_power_of_2(num_instances)
            if args.mode == "drop":
                tuned = overlap._prune_word_configs(
                    list(overlap._WORD_CONFIGS), {"words_per_row": width // 4, "words_ptr": masks, "out_ptr": masks},
                    KP=kp, ZERO_ONE=masks.dtype == torch.bool)
                candidates = [("tuned", config) for config in tuned] + [
                    ("extra", config) for config in extras if config.kwargs["TILE"] >= kp and config not in tuned]
            else:
                configs = overlap._BYTE_CONFIGS
                if args.cpu_smoke:  # the first config of each design (tile, rows, strip): the interpreter is slow
                    firsts = {}
                    for config in configs:
                        firsts.setdefault((config.kwargs["ROWS"], config.kwargs.get("STRIP_ROWS", 0) > 0), config)
                    configs = list(firsts.values())
                candidates = [("tuned", config) for config in configs]
            timings = [("copy", "copy", lambda: target.copy_(source))]
            for origin, config in candidates:
                out, boxes = overlap.suppress_overlap_triton(masks, confidence, counts, args.mode, config=config)
                if not (torch.equal(out, expected_out) and torch.equal(boxes, expected_boxes)):
                    raise AssertionError(f"{describe(config)} at {shape} ({kind}) differs from the reference")
                timings.append((origin, describe(config), lambda config=config: overlap.suppress_overlap_triton(
                    masks, confidence, counts, args.mode, config=config)))
            for origin, name, fn in timings:
                alone = median_call_ms(fn, wall_clock=args.cpu_smoke)
                together = None if args.cpu_smoke else float(
                    triton.testing.do_bench_cudagraph(fn, return_mode="median"))
                percent = lambda ms: 100 * num_bytes / (ms * 1e-3) / 1e9 / copy_gbps  # noqa: E731
                row = {"shape": shape, "masks": kind, "config": name, "origin": origin, "alone_ms": alone,
                       "alone_pct_copy": percent(alone), "back_to_back_ms": together,
                       "back_to_back_pct_copy": None if together is None else percent(together)}
                result["rows"].append(row)
                save()  # a run cut short keeps its rows
                print(f"{shape} {kind:7s} {name:70s} alone {alone:.4f} ms ({row['alone_pct_copy']:.1f}%)"
                      + ("" if together is None else
                         f", back to back {together:.4f} ms ({row['back_to_back_pct_copy']:.1f}%)"), flush=True)
            del masks
    return 0


def markdown(result: dict) -> str:
    title = ("Word-kernel configs of \"drop\"" if result.get("mode", "drop") == "drop"
             else "Byte-kernel configs of \"argmax\"")
    lines = [f"# {title} overlap suppression\n",
             f"Device: **{result['device']}** (torch {result['torch']}, triton {result['triton']}). "
             f"Copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s. \"alone\": `do_bench` median (L2 "
             "cleared before each call); \"back to back\": `do_bench_cudagraph` median. % of the copy "
             "bandwidth for the bytes the call must move.\n",
             "| shape | masks | config | origin | alone ms | % copy | back to back ms | % copy |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        together = ("-", "-") if row["back_to_back_ms"] is None else (
            f"{row['back_to_back_ms']:.4f}", f"{row['back_to_back_pct_copy']:.1f}")
        lines.append(f"| {row['shape']} | {row['masks']} | {row['config']} | {row['origin']} | "
                     f"{row['alone_ms']:.4f} | {row['alone_pct_copy']:.1f} | {together[0]} | {together[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
