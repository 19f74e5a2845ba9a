"""Loader throughput vs training consumption: can the DALI pipeline feed the training step?

    python benchmarks/bench_loader.py [--out benchmarks/results] [--model tiny] [--batch 4]

Writes synthetic scenes (`--kind`, default `sar_ships`: ~10 ships per tile, one-channel SAR
images like HRSID) as COCO, cuts them into shards with resam-prep (or reads
`--shards`), then measures on this machine's device (the GPU "mixed" pipeline when CUDA is
available, else the CPU pipeline):

- loader: images/s over whole epochs of `build_train_loader` (decode, weak + strong views,
  masks, prompts and the torch-side batch assembly), after one warm-up epoch;
- training: images/s of the real step (`resam_step` + backward + AdamW on the LoRA weights +
  queue push) on batches from the same loader, median of `--steps` timed steps after warm-up.

The ratio loader / training should be >= 3 (the loader then costs at most a third of a core's
attention and hides behind the step). On a CPU machine both run on the same cores in real
training; here they are measured one after the other. Writes `loader_<device>.json` and
`loader_<device>.md` (device = cpu or cuda) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 3.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for loader_<device>.json/.md")
    parser.add_argument("--shards", type=Path, default=None,
                        help="existing shard folder (manifest.json); default: synthetic scenes through resam-prep")
    parser.add_argument("--model", default="tiny", help="SAM variant of the training step (canvas = its image size)")
    parser.add_argument("--kind", default="sar_ships", choices=("sar_ships", "buildings", "source_shapes"),
                        help="synthetic scene kind (default sar_ships; buildings has ~65 instances per tile)")
    parser.add_argument("--images", type=int, default=32, help="synthetic scenes to write (default 32)")
    parser.add_argument("--scene-size", type=int, default=320, help="synthetic scene side in px (default 320)")
    parser.add_argument("--tile-size", type=int, default=256, help="resam-prep tile size (default 256)")
    parser.add_argument("--batch", type=int, default=4, help="images per rank per step (default 4)")
    parser.add_argument("--num-points", type=int, default=1, help="point prompts per instance (default 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="DALI CPU threads (default: the number of CPU cores, at most 8)")
    parser.add_argument("--epochs", type=int, default=2, help="timed loader epochs (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps (default 5)")
    args = parser.parse_args(argv)
    for name in ("images", "scene_size", "tile_size", "batch", "epochs", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def make_shards(folder: Path, *, kind: str, images: int, scene_size: int, tile_size: int) -> Path:
    from resam_dist.data.shards import main as resam_prep
    from resam_dist.data.synthetic import write_synthetic_coco

    annotations = write_synthetic_coco(folder / "coco", kind, images, scene_size, seed=0)
    code = resam_prep(["--annotations", str(annotations), "--images", str(folder / "coco" / "images"),
                       "--out", str(folder / "shards"), "--tile-size", str(tile_size), "--overlap", "32",
                       "--shard-size-mb", "4", "--no-progress"])
    if code != 0:
        raise RuntimeError(f"resam-prep failed with exit code {code}")
    return folder / "shards"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(cfg, *, image_size: int, device: torch.device, epochs: int) -> dict:
    from resam_dist.data.pipeline import build_train_loader

    start = time.perf_counter()
    loader = build_train_loader(cfg, image_size=image_size, rank=0, world_size=1, local_rank=0, device=device)
    warm_batches = list(loader)            # warm-up epoch: pipeline build, first allocations
    synchronize(device)
    warm_seconds = time.perf_counter() - start
    images = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images += batch.weak.shape[0]
        synchronize(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "timed_images": images, "timed_seconds": seconds,
            "batches_per_epoch": len(loader), "first_epoch_seconds": warm_seconds,
            "samples_per_epoch": loader.num_samples}, warm_batches


def time_training(cfg, batches: list, *, device: torch.device, steps: int) -> dict:
    from resam_dist.model.build import build_sam
    from resam_dist.model.lora import apply_lora
    from resam_dist.resam.queue import EmbeddingQueue

    model = build_sam(cfg.model.name, seed=cfg.train.seed)
    apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               start_block=cfg.lora.start_block, seed=cfg.train.seed)
    model.to(device).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    queue = EmbeddingQueue(cfg.resam.queue_size, model.embed_dim, device=device)
    try:
        from resam_dist.resam.step import resam_step
    except ImportError:
        resam_step = None

    def one_step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        if resam_step is not None:
            result = resam_step(model, batch, queue, cfg)
            result.loss.backward()
            optimizer.step()
            queue.push(result.weak_embeddings)
        else:   # student path only: forward + backward of the point-prompted decoder
            features = model.encode(batch.strong)
            logits, _ = model.decode(features, batch.counts, batch.points, batch.point_labels)
            logits.float().square().mean().backward()
            optimizer.step()

    for batch in batches[:1]:   # warm-up
        one_step(batch)
    synchronize(device)
    durations = []
    for index in range(steps):
        batch = batches[index % len(batches)]
        start = time.perf_counter()
        one_step(batch)
        synchronize(device)
        durations.append(time.perf_counter() - start)
    median = statistics.median(durations)
    return {"what": "resam_step + backward + AdamW + queue push" if resam_step is not None
            else "student encode + decode forward + backward + AdamW (resam_step not available)",
            "images_per_s": batches[0].weak.shape[0] / median, "median_step_seconds": median,
            "step_seconds": durations}


def write_results(out: Path, results: dict) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = f"loader_{results['device_kind']}"
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(results, indent=1))
    loader, train = results["loader"], results["training"]
    verdict = "meets" if results["ratio"] >= TARGET_RATIO else "MISSES"
    md_path.write_text("\n".join([
        f"# Loader throughput vs training step ({results['device']})",
        "",
        f"Model `{results['model']}`, canvas {results['image_size']} px, batch {results['batch']}, "
        f"{results['num_points']} point(s) per instance, DALI threads {results['threads']}, "
        f"{loader['samples_per_epoch']} samples ({results['data']}).",
        "",
        "| what | images/s |",
        "|---|---|",
        f"| loader ({results['pipeline']} pipeline, {results['epochs']} epochs after a warm-up epoch) | "
        f"{loader['images_per_s']:.1f} |",
        f"| training: {train['what']} (median of {len(train['step_seconds'])} steps) | {train['images_per_s']:.1f} |",
        "",
        f"Ratio loader / training: **{results['ratio']:.2f}** (target >= {TARGET_RATIO:.0f}: {verdict}).",
        f"First epoch including the pipeline build: {loader['first_epoch_seconds']:.2f} s. "
        f"Machine load average (1 min) at the end: {results['load_average_1min']}.",
        "",
        results["note"],
        "",
    ]))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from resam_dist.config import Config
    from resam_dist.model.build import IMAGE_SIZE

    if args.model not in IMAGE_SIZE:
        print(f"unknown model {args.model!r}; choose one of {sorted(IMAGE_SIZE)}", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    threads = args.threads or min(os.cpu_count() or 1, 8)
    cfg = Config()
    cfg.model.name = args.model
    cfg.lora.start_block = 0
    cfg.kernels.enabled = device.type == "cuda"   # on CPU the torch references (Triton's interpreter is a test tool)
    cfg.train.images_per_rank = args.batch
    cfg.data.num_points = args.num_points
    cfg.data.reader_threads = threads
    cfg.data.seed = 0
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as temp:
        if args.shards is not None:
            shards, data = args.shards, f"shards {args.shards}"
        else:
            shards = make_shards(Path(temp), kind=args.kind, images=args.images, scene_size=args.scene_size,
                                 tile_size=args.tile_size)
            data = (f"{args.images} synthetic {args.kind} scenes of {args.scene_size} px cut into "
                    f"{args.tile_size} px tiles by resam-prep")
        cfg.data.train_shards = str(shards)
        loader, batches = time_loader(cfg, image_size=IMAGE_SIZE[args.model], device=device, epochs=args.epochs)
        training = time_training(cfg, batches, device=device, steps=args.steps)
    results = {
        "device_kind": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "pipeline": "mixed (GPU)" if device.type == "cuda" else "CPU",
        "model": args.model, "image_size": IMAGE_SIZE[args.model], "batch": args.batch,
        "num_points": args.num_points, "threads": threads, "epochs": args.epochs, "data": data,
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "loader": loader, "training": training,
        "ratio": loader["images_per_s"] / training["images_per_s"], "target_ratio": TARGET_RATIO,
        "note": ("CPU: the loader and the step were timed one after the other; in training they share "
                 "the same cores, so the loader's share of the step time is 1 / ratio."
                 if device.type == "cpu" else
                 "GPU: decoding and augmentation run on the GPU the step also uses; timed one after the other."),
    }
    json_path, md_path = write_results(args.out, results)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
