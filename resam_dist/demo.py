"""resam-demo: point-supervised domain adaptation end to end, on an embedded synthetic default.

No SAM weights can be had on these machines, so the demo reproduces the paper's setting in
small: a tiny SAM pretrained with full mask supervision on a "source" domain (the stand-in for
SAM's own pretraining: plain shapes, buildings with gaps, touching buildings whose roofs differ
in colour, ships under mild speckle) is adapted from point prompts only to a shifted "target"
domain. The default target (`rooftops-ships`): buildings with gaps whose roofs carry equipment
(solar panels, air-conditioning units, skylights), where the teacher's point-prompted masks stop
at the equipment and Requery's boxes recover the whole roof, and SAR-like scenes with ships under
heavy speckle (a quarter of the images). Objects are drawn at twice the synthetic generator's
base size (`--object-scale`), so a building spans 2-5 of the tiny model's 16-pixel feature cells.

    1. write the source and target domains as COCO (resam_dist.data.synthetic) and convert the
       target training split with resam-prep (WebDataset shards + DALI index + manifest);
    2. pretrain the tiny SAM on the source domain, then train it `--robust-steps` more source
       steps with half the images photometrically distorted like the strong view, so that the
       teacher does not break down when only the appearance changes (both cached: a second run
       skips them);
    3. evaluate it directly on the target test split (1 point per instance);
    4. adapt it with ReSAM through the real path, once per seed (120 steps):
       `deepspeed --num_gpus 2 launch/train.py --config configs/demo.json` (2 CPU ranks, ZeRO-2,
       shards, DALI, kernels, metrics, checkpoints);
    5. evaluate the adapted models and print the table (mean and spread over seeds), with the
       IoU of the pseudo-labels at each stage (point-prompted, Refine, Requery) against the
       ground truth, before and after adaptation; write results.json and PNG overlays.

`--ablations` adds self-training only, + Requery (Refine + Requery without SSA) and a fully
supervised upper bound on the target domain.

`--target rooftops` keeps the rooftop buildings only. `--target dense` is the earlier default:
dense blocks of touching buildings with near-identical roofs per block (point-prompted masks leak
into the neighbours) and SAR ships, adapted for 40 steps from the pretrained model as it is. There
each Requery label depends on where the neighbours were clicked, so a 1-point student cannot
learn it, and ReSAM stays within the seed spread of self-training (docs/DEMO_FINDINGS.md). Each
target other than the default writes to runs/demo-<target>.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.json"
TARGET_KINDS = ("buildings", "sar_ships")

TARGETS = ("rooftops-ships", "rooftops", "dense")
"""`rooftops-ships` (default): buildings with gaps whose roofs carry equipment, and SAR ships (a
quarter of the images); `rooftops`: those buildings only. Both adapt a teacher made robust to
appearance changes first, for configs/demo.json's max_steps (120). `dense`: dense blocks of
touching buildings and SAR ships, the pretrained teacher as it is, DENSE_STEPS steps."""
DEFAULT_TARGET = "rooftops-ships"
ROBUST_TEACHER_TARGETS = ("rooftops-ships", "rooftops")
DENSE_STEPS = 40
ROBUST_STEPS, ROBUST_LR, ROBUST_PHOTOMETRIC = 300, 3e-4, 0.5

# Row name -> config overrides of the adaptation run.
VARIANTS: dict[str, dict[str, Any]] = {
    "self-training only": {"resam.method": "selftrain"},
    "+ Requery": {"resam.method": "resam", "resam.ssa_weight": 0.0},
    "ReSAM (full)": {"resam.method": "resam"},
    "supervised (upper bound)": {"resam.method": "supervised"},
}


# ------------------------------------------------------------------------------------ data
def write_domain(out_dir: Path, kinds: dict[str, int], *, size: int, seed: int, object_scale: float = 1.0) -> Path:
    """One COCO split mixing scene kinds ({kind: number of images}); returns the JSON path.

    Each kind keeps its own category (renumbered 1..n in the order of `kinds`). annotations.json,
    written last and atomically, marks a finished split: a split cut short is written again."""
    from resam_dist.data.synthetic import write_synthetic_coco

    annotation_file = out_dir / "annotations.json"
    if annotation_file.exists():
        return annotation_file
    images: list[dict] = []
    annotations: list[dict] = []
    categories: list[dict] = []
    first_image, first_annotation = 1, 1
    for kind_index, (kind, count) in enumerate(kinds.items()):
        part = write_synthetic_coco(out_dir, kind, count, size, seed=seed + 1000 * kind_index,
                                    segmentation="mixed", first_image_id=first_image,
                                    first_annotation_id=first_annotation, object_scale=object_scale,
                                    annotation_name=f"part_{kind}.json")
        coco = json.loads(part.read_text())
        part.unlink()
        category_map = {}
        for category in coco["categories"]:
            category_map[category["id"]] = len(categories) + 1
            categories.append({**category, "id": len(categories) + 1})
        for annotation in coco["annotations"]:
            annotation["category_id"] = category_map[annotation["category_id"]]
        images += coco["images"]
        annotations += coco["annotations"]
        first_image += count
        first_annotation += len(coco["annotations"])
    temporary = annotation_file.with_suffix(".tmp")
    temporary.write_text(json.dumps({"info": {"description": f"synthetic {'+'.join(kinds)}", "seed": seed},
                                     "images": images, "annotations": annotations, "categories": categories}))
    temporary.replace(annotation_file)
    return annotation_file


def target_kinds(target: str, images: int) -> dict[str, int]:
    """The scene kinds of a target split of `images` images ({kind: number of images})."""
    if target == "rooftops-ships":
        return {"rooftop_buildings": images - images // 4, "sar_ships": images // 4}
    if target == "dense":
        return {"buildings": images - images // 4, "sar_ships": images // 4}
    if target == "rooftops":
        return {"rooftop_buildings": images}
    raise ValueError(f"unknown demo target {target!r}; choose one of {TARGETS}")


def prepare_data(out: Path, *, size: int, train_images: int, test_images: int, source_images: int,
                 object_scale: float, target: str = DEFAULT_TARGET) -> dict[str, Path]:
    """Write the three COCO splits and the target shards (skipped when already there)."""
    from resam_dist.data.shards import main as prep_main

    per_kind = lambda n: target_kinds(target, n)  # noqa: E731
    source_kinds = {kind: source_images // 4
                    for kind in ("source_shapes", "sparse_buildings", "city_buildings", "calm_sar_ships")}
    paths = {
        "source": write_domain(out / "coco" / "source", source_kinds, size=size, seed=11, object_scale=object_scale),
        "target_train": write_domain(out / "coco" / "target-train", per_kind(train_images), size=size, seed=22,
                                     object_scale=object_scale),
        "target_test": write_domain(out / "coco" / "target-test", per_kind(test_images), size=size, seed=33,
                                    object_scale=object_scale),
    }
    shards = out / "shards" / "target-train"
    if not (shards / "manifest.json").exists():
        code = prep_main(["--annotations", str(paths["target_train"]), "--images", str(paths["target_train"].parent / "images"),
                          "--out", str(shards), "--prefix", "train", "--tile-size", str(size), "--overlap", "0",
                          "--shard-size-mb", "2", "--seed", "0", "--no-progress"])
        if code != 0:
            raise RuntimeError(f"resam-prep failed on {paths['target_train']} (exit {code})")
    paths["shards"] = shards
    return paths


def claim_output_folder(out: Path, settings: dict[str, Any]) -> None:
    """Records `settings` in out/demo_settings.json, or checks them against the recorded ones: a
    demo reuses the data and the finished adaptation runs it finds in its folder, so a folder made
    with another target, size, number of steps or teacher is refused (ValueError) rather than
    silently mixed in. Keys not yet recorded are added (the teacher is known only after
    pretraining). A non-empty folder without the file is refused too."""
    marker = out / "demo_settings.json"
    if marker.exists():
        recorded = json.loads(marker.read_text())
        differing = {key: (recorded[key], value) for key, value in settings.items()
                     if key in recorded and recorded[key] != value}
        if differing:
            listed = ", ".join(f"{key} {old!r} there, {new!r} now" for key, (old, new) in differing.items())
            raise ValueError(f"{out} holds a demo made with other settings ({listed}); delete the folder "
                             "or pass another --out")
        settings = {**recorded, **settings}
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and has no demo_settings.json (an earlier version of the demo, or "
                         "other files); delete the folder or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    temporary = marker.with_suffix(".tmp")
    temporary.write_text(json.dumps(settings, indent=2))
    temporary.replace(marker)


# ------------------------------------------------------------------------------ pretraining
def split_digest(annotation_file: Path) -> str:
    """SHA-256 of a split: its annotation file (every instance's polygon or RLE) and the bytes of
    every image it names, in its order. The annotations alone miss a change of appearance (colours,
    speckle) that leaves the geometry as it was."""
    content = annotation_file.read_bytes()  # read once: hashed, then parsed
    digest = hashlib.sha256(content)
    for image in json.loads(content)["images"]:
        digest.update(image["file_name"].encode())
        digest.update(hashlib.sha256((annotation_file.parent / "images" / image["file_name"]).read_bytes()).digest())
    return digest.hexdigest()


def pretraining_key(source: Path, *, steps: int, images_per_step: int, lr: float) -> str:
    """12 hex digits naming a cached pretrained model: its settings and the whole source split
    (`split_digest`). The first 2 KB of the annotation file, the key of earlier versions, did not
    change when the synthetic domains did, so a model pretrained on an older domain was silently
    reused."""
    return hashlib.sha256(json.dumps([steps, images_per_step, lr, split_digest(source)]).encode()).hexdigest()[:12]


def _save_to_cache(model, path: Path) -> None:
    """Write the model's state dict to `path` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(path)


def pretrained_checkpoint(cache: Path, source: Path, *, steps: int, images_per_step: int, lr: float) -> Path:
    """The tiny SAM pretrained on the source domain, cached by its settings."""
    from resam_dist.data.coco import CocoSplit
    from resam_dist.model.build import build_sam
    from resam_dist.train.pretrain import pretrain

    path = cache / f"tiny_source_{pretraining_key(source, steps=steps, images_per_step=images_per_step, lr=lr)}.pth"
    if path.exists():
        print(f"[demo] pretrained source model from cache: {path}", flush=True)
        return path
    print(f"[demo] pretraining the tiny SAM on the source domain ({steps} steps) ...", flush=True)
    started = time.perf_counter()
    model = build_sam("tiny", seed=0)
    split = CocoSplit(source, source.parent / "images")
    pretrain(model, split=split, steps=steps, images_per_step=images_per_step, lr=lr, seed=0, keep_decoded=True)
    _save_to_cache(model, path)
    print(f"[demo] pretraining took {time.perf_counter() - started:.0f} s -> {path}", flush=True)
    return path


def robust_checkpoint(cache: Path, base: Path, source: Path, *, steps: int, lr: float, photometric: float) -> Path:
    """`base` (the pretrained source model) trained `steps` more source steps with a
    `photometric` fraction of the images distorted like the strong view: a teacher that does not
    break down when only the appearance changes (real SAM gets that from its varied training
    data). Cached by its settings."""
    from resam_dist.data.coco import CocoSplit
    from resam_dist.model.build import build_sam
    from resam_dist.train.pretrain import pretrain

    # the base model's bytes, not its name: a base pretrained again (CPU pretraining is not bitwise
    # reproducible) under the same name must not reuse a teacher made from the old one
    key = hashlib.sha256(json.dumps([hashlib.sha256(base.read_bytes()).hexdigest(), steps, lr, photometric,
                                     split_digest(source)]).encode()).hexdigest()[:12]
    path = cache / f"tiny_source_robust_{key}.pth"
    if path.exists():
        print(f"[demo] photometrically robust source model from cache: {path}", flush=True)
        return path
    print(f"[demo] {steps} more source steps with photometric distortion ({photometric:.0%} of the images) ...",
          flush=True)
    started = time.perf_counter()
    model = build_sam("tiny", checkpoint=base)
    split = CocoSplit(source, source.parent / "images")
    pretrain(model, split=split, steps=steps, images_per_step=4, lr=lr, seed=1, keep_decoded=True,
             photometric=photometric)
    _save_to_cache(model, path)
    print(f"[demo] that took {time.perf_counter() - started:.0f} s -> {path}", flush=True)
    return path


# ---------------------------------------------------------------------------- adaptation
def adapt(out_dir: Path, *, checkpoint: Path, shards: Path, seed: int, overrides: dict[str, Any], ranks: int,
          steps: int) -> Path:
    """One adaptation run through `deepspeed launch/train.py`; returns its run directory."""
    run_dir = out_dir
    if (run_dir / "export" / "adapter" / "adapter_config.json").exists():
        print(f"[demo] reusing finished run {run_dir}", flush=True)
        return run_dir
    settings = {"model.checkpoint": str(checkpoint), "data.train_shards": str(shards),
                "train.seed": seed, "data.seed": seed,
                "train.output_dir": str(run_dir), "train.max_steps": steps,
                # free metrics ports (written to the run's train_log.jsonl): demos side by side, or a
                # demo beside the tests, do not collide on configs/demo.json's fixed ones
                "metrics.base_port": 0, **overrides}
    command = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(_free_port()), str(REPO / "launch" / "train.py"),
               "--config", str(DEMO_CONFIG)]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")
    print(f"[demo] $ {' '.join(command)}", flush=True)
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "launcher.log", "w") as log:
        process = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        tail = (run_dir / "launcher.log").read_text()[-3000:]
        raise RuntimeError(f"adaptation run failed (exit {process.returncode}); end of {run_dir / 'launcher.log'}:\n{tail}")
    print(f"[demo]   done in {time.perf_counter() - started:.0f} s", flush=True)
    return run_dir


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def training_stats(run_dir: Path) -> dict[str, float]:
    """Pseudo-label IoUs logged by the training step (rank 0), first and last quarter of the run."""
    from resam_dist.train.metrics import read_jsonl  # (non-finite numbers as floats again)
    rows = read_jsonl(run_dir / "train_log.jsonl")
    steps = [row for row in rows if row.get("event") == "step"]
    if not steps:
        return {}
    quarter = max(1, len(steps) // 4)
    summary: dict[str, float] = {}
    for stage in ("iou_point", "iou_refined", "iou_requery", "iou_pseudo"):
        for name, chunk in (("first", steps[:quarter]), ("last", steps[-quarter:])):
            values = [row["stats_rank0"][stage] for row in chunk if stage in row.get("stats_rank0", {})]
            if values:
                summary[f"{stage}_{name}"] = float(np.mean(values))
    summary["seconds_per_step"] = float(np.mean([row["step_seconds"] + row["data_wait_seconds"] for row in steps]))
    return summary


# ---------------------------------------------------------------------------- evaluation
QUALITY_STAGES = ("point", "refined", "requery", "point_box", "gt_box")


def _kind(file_name: str) -> str:
    return "sar_ships" if file_name.startswith("sar_ships") else "buildings"


def pseudo_label_quality(model, split, *, cfg, max_images: int = 1000) -> dict[str, float]:
    """Micro-imagewise IoU against ground truth of the teacher's masks at each stage
    (point-prompted, Refine, Requery = the pseudo-labels) on a COCO split, measured on the model
    canvas, over all images and per scene kind (`<stage>_<kind>` keys).

    `point_box` is the teacher prompted with the tight boxes of its own point-prompted masks:
    Requery without Refine, so `requery` - `point_box` is what Refine's boxes add.
    `gt_box` is the teacher prompted with the tight boxes of the ground-truth masks: the ceiling
    of Requery (what it would give if Refine recovered every instance's extent exactly)."""
    from resam_dist.eval.evaluate import prepare_canvas, sample_prompts
    from resam_dist.eval.metrics import ImagewiseMeter
    from resam_dist.resam.prompts import masks_to_boxes
    from resam_dist.resam.refine import refine
    from resam_dist.resam.requery import pseudo_labels, requery

    meters = {(stage, kind): ImagewiseMeter() for stage in QUALITY_STAGES for kind in ("all",) + TARGET_KINDS}
    model.eval()
    with torch.no_grad():
        for image_id in list(split.image_ids)[:max_images]:
            item = split.load(image_id)
            if item is None or item.masks.shape[0] == 0:
                continue
            canvas, (new_h, new_w) = prepare_canvas(item.image, model.image_size, "cpu")
            points, labels = sample_prompts(item.masks, 1, seed=cfg.eval.seed, image_id=int(image_id),
                                            original_hw=item.image.shape[:2], resized_hw=(new_h, new_w))
            gt = torch.from_numpy(item.masks).unsqueeze(0).float()  # 1 x K x H x W
            gt = F.interpolate(gt, size=(new_h, new_w), mode="nearest") > 0.5
            gt = F.pad(gt, (0, model.image_size - new_w, 0, model.image_size - new_h))  # 1 x K x S x S
            counts = torch.tensor([item.masks.shape[0]])
            features = model.encode(canvas.unsqueeze(0))
            logits, _ = model.decode(features, counts, points.unsqueeze(0), labels.unsqueeze(0))
            point_masks = logits > 0
            refined = refine(logits, counts, eps=cfg.resam.entropy_eps, mode=cfg.resam.overlap_mode,
                             use_kernels=cfg.kernels.enabled)
            requery_logits = requery(model, features, refined.boxes, counts, max_instances=cfg.data.max_instances)
            pseudo, _ = pseudo_labels(point_masks, requery_logits, refined.empty, counts,
                                      empty_policy=cfg.resam.empty_policy)
            gt_box_logits = requery(model, features, masks_to_boxes(gt), counts,
                                    max_instances=cfg.data.max_instances)  # 1 x K x S x S
            point_box_logits = requery(model, features, masks_to_boxes(point_masks), counts,
                                       max_instances=cfg.data.max_instances)  # 1 x K x S x S
            point_box, _ = pseudo_labels(point_masks, point_box_logits, ~point_masks.flatten(2).any(-1), counts,
                                         empty_policy=cfg.resam.empty_policy)  # an empty mask has no box
            masks = {"point": point_masks, "refined": refined.masks, "requery": pseudo,
                     "point_box": point_box, "gt_box": gt_box_logits > 0}
            for stage, stage_masks in masks.items():
                for kind in ("all", _kind(item.file_name)):
                    meters[stage, kind].update(stage_masks, gt)
    quality = {}
    for (stage, kind), meter in meters.items():
        if meter.state[meter.FIELDS.index("images")] > 0:
            quality[stage if kind == "all" else f"{stage}_{kind}"] = meter.compute()["miou"]
    return quality


def evaluate_checkpoint(cfg, split, adapter: Path | None) -> tuple[dict[str, float], Any]:
    from resam_dist.eval.evaluate import evaluate_model, load_model

    model, _ = load_model(cfg, adapter)
    result = evaluate_model(model, split, num_points=1, seed=cfg.eval.seed, batch_size=8, device="cpu",
                            max_instances=cfg.data.max_instances)
    per_kind: dict[str, list[float]] = {}
    for row in result.per_image:
        if row.get("evaluated"):
            kind = "sar_ships" if row["file_name"].startswith("sar_ships") else "buildings"
            per_kind.setdefault(kind, []).append(row["iou"])
    scores = dict(result.scores)
    for kind, values in per_kind.items():
        scores[f"miou_{kind}"] = float(np.mean(values))
    return scores, model


# ------------------------------------------------------------------------------ overlays
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.uint8)


def _overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 with each of the K x H x W masks tinted in its own colour."""
    out = image.astype(np.float32).copy()
    for k, mask in enumerate(masks):
        out[mask] = 0.45 * out[mask] + 0.55 * PALETTE[k % len(PALETTE)]
    return out.astype(np.uint8)


def write_overlays(path: Path, direct_model, adapted_model, split, cfg, count: int) -> list[str]:
    """PNG panels per tile: ground truth | direct | refined | requeried | adapted."""
    from PIL import Image, ImageDraw

    from resam_dist.eval.evaluate import canvas_logits_to_masks, prepare_canvas, sample_prompts
    from resam_dist.resam.refine import refine
    from resam_dist.resam.requery import pseudo_labels, requery

    if count <= 0:
        return []
    path.mkdir(parents=True, exist_ok=True)
    written = []
    chosen = list(split.image_ids)[:: max(1, len(split.image_ids) // count)][:count]
    for image_id in chosen:
        item = split.load(image_id)
        if item is None or item.masks.shape[0] == 0:
            continue
        canvas, resized = prepare_canvas(item.image, direct_model.image_size, "cpu")
        original = item.image.shape[:2]
        points, labels = sample_prompts(item.masks, 1, seed=cfg.eval.seed, image_id=int(image_id),
                                        original_hw=original, resized_hw=resized)
        counts = torch.tensor([item.masks.shape[0]])
        panels = {"ground truth": item.masks}
        with torch.no_grad():
            features = direct_model.encode(canvas.unsqueeze(0))
            logits, _ = direct_model.decode(features, counts, points.unsqueeze(0), labels.unsqueeze(0))
            refined = refine(logits, counts, eps=cfg.resam.entropy_eps, mode=cfg.resam.overlap_mode,
                             use_kernels=cfg.kernels.enabled)
            requery_logits = requery(direct_model, features, refined.boxes, counts,
                                     max_instances=cfg.data.max_instances)
            pseudo, _ = pseudo_labels(logits > 0, requery_logits, refined.empty, counts,
                                      empty_policy=cfg.resam.empty_policy)
            adapted_logits, _ = adapted_model.decode(adapted_model.encode(canvas.unsqueeze(0)), counts,
                                                     points.unsqueeze(0), labels.unsqueeze(0))
        panels["direct"] = canvas_logits_to_masks(logits[0], resized, original).numpy()
        panels["refined"] = canvas_logits_to_masks(refined.masks[0].float() * 2 - 1, resized, original).numpy()
        panels["requeried"] = canvas_logits_to_masks(pseudo[0].float() * 2 - 1, resized, original).numpy()
        panels["adapted"] = canvas_logits_to_masks(adapted_logits[0], resized, original).numpy()
        height, width = original
        sheet = Image.new("RGB", (width * len(panels), height + 18), "white")
        draw = ImageDraw.Draw(sheet)
        for index, (title, masks) in enumerate(panels.items()):
            tile = _overlay(item.image, masks)
            for x, y in points[:, 0].numpy() * np.array([width / resized[1], height / resized[0]]):
                tile[max(0, int(y) - 1):int(y) + 2, max(0, int(x) - 1):int(x) + 2] = (255, 255, 255)
            sheet.paste(Image.fromarray(tile), (index * width, 18))
            draw.text((index * width + 4, 3), title, fill="black")
        file = path / f"overlay_{image_id:05d}.png"
        sheet.save(file)
        written.append(str(file))
    return written


# ----------------------------------------------------------------------------------- main
def _mean_spread(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    header = (f"{'method (1 point, target test)':32s} {'mIoU':>14s} {'F1':>14s} {'inst-mean':>10s} "
              f"{'buildings':>10s} {'ships':>8s}  seeds")
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        def cell(key: str, width: int) -> str:
            mean, spread = row[key]
            return f"{100 * mean:6.2f} ± {100 * spread:4.2f}".rjust(width) if row["n"] > 1 else f"{100 * mean:6.2f}".rjust(width)
        def kind(key: str, width: int) -> str:  # a target without that kind shows "-"
            return f"{100 * row[key][0]:{width}.2f}" if key in row else "-".rjust(width)
        lines.append(f"{name:32s} {cell('miou', 14)} {cell('f1', 14)} {kind('miou_instances', 10)} "
                     f"{kind('miou_buildings', 10)} "
                     f"{kind('miou_sar_ships', 8)}  {row['n']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="resam-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--target", choices=TARGETS, default=DEFAULT_TARGET,
                        help="rooftops-ships (default): buildings with gaps and rooftop equipment, and SAR ships; "
                             "rooftops: those buildings only; dense: dense blocks of touching buildings and SAR "
                             f"ships, {DENSE_STEPS} steps from the pretrained teacher as it is")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/demo for the default target, runs/demo-<target> otherwise)")
    parser.add_argument("--cache", default="cache/demo", help="folder of the cached pretrained models")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="adaptation seeds")
    parser.add_argument("--ablations", action="store_true",
                        help="also run self-training only, + Requery, and the supervised upper bound")
    parser.add_argument("--ranks", type=int, default=2, help="training processes (CPU ranks)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"adaptation steps (default: configs/demo.json's max_steps; {DENSE_STEPS} with --target dense)")
    parser.add_argument("--pretrain-steps", type=int, default=2400,
                        help="source pretraining steps (one-off, cached: 15-20 minutes on 2 cores; 560 or 900 "
                             "steps (3-6 minutes) leave the teacher too weak for ReSAM to gain)")
    parser.add_argument("--size", type=int, default=256,
                        help="scene size in pixels: 256, the tiny SAM's canvas (other sizes are refused)")
    parser.add_argument("--train-images", type=int, default=64)
    parser.add_argument("--test-images", type=int, default=32)
    parser.add_argument("--object-scale", type=float, default=2.0,
                        help="object size factor of the synthetic scenes (2: a building spans 2-5 of the tiny "
                             "model's 16-px feature cells)")
    parser.add_argument("--overlays", type=int, default=4, help="tiles drawn as PNG overlays (0: none)")
    parser.add_argument("--robust-steps", type=int, default=ROBUST_STEPS,
                        help="source steps with half the images photometrically distorted that make the teacher "
                             "of the rooftop targets (one-off, cached: about 2 minutes on 2 cores); 0: adapt the "
                             "pretrained teacher as it is")
    args = parser.parse_args(argv)
    if not (DEMO_CONFIG.is_file() and (REPO / "launch" / "train.py").is_file()):
        parser.error(f"the demo runs from a checkout of the repository (pip install -e .): {DEMO_CONFIG} or "
                     f"{REPO / 'launch' / 'train.py'} is missing")
    for flag, value, least in (("--pretrain-steps", args.pretrain_steps, 1), ("--steps", args.steps, 1),
                               ("--robust-steps", args.robust_steps, 0), ("--ranks", args.ranks, 1),
                               ("--train-images", args.train_images, 1), ("--test-images", args.test_images, 1),
                               ("--overlays", args.overlays, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.size != 256:  # the tiny SAM's canvas: its pretraining and the adaptation config take 256 px scenes
        parser.error(f"--size must be 256 (the tiny SAM's 256 px canvas), got {args.size}")

    from resam_dist.config import load_config
    from resam_dist.data.coco import CocoSplit

    # all cores, unless OMP_NUM_THREADS says otherwise: beside another busy process, 2 threads on
    # 2 cores spin-wait (50 pretraining steps took 419 s with 2 threads, 40 s with 1)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, os.cpu_count() or 1)))
    started = time.perf_counter()
    out = Path(args.out or ("runs/demo" if args.target == DEFAULT_TARGET else f"runs/demo-{args.target}")).resolve()
    cfg = load_config(DEMO_CONFIG)
    steps = args.steps if args.steps is not None else (DENSE_STEPS if args.target == "dense" else cfg.train.max_steps)
    settings = {"target": args.target, "size": args.size, "train_images": args.train_images,
                "test_images": args.test_images, "object_scale": args.object_scale, "adaptation_steps": steps,
                "pretrain_steps": args.pretrain_steps,
                "robust_steps": args.robust_steps if args.target in ROBUST_TEACHER_TARGETS else 0, "ranks": args.ranks}

    def claim(entries: dict[str, Any]) -> None:  # a refused folder: exit 2 with the message, nothing written
        try:
            claim_output_folder(out, entries)
        except ValueError as error:
            parser.error(str(error))
    claim(settings)
    print(f"[demo] writing synthetic domains and shards under {out} ...", flush=True)
    paths = prepare_data(out, size=args.size, train_images=args.train_images, test_images=args.test_images,
                         source_images=128, object_scale=args.object_scale, target=args.target)
    pretraining_started = time.perf_counter()
    checkpoint = pretrained_checkpoint(Path(args.cache).resolve(), paths["source"], steps=args.pretrain_steps,
                                       images_per_step=4, lr=1e-3)
    if args.target in ROBUST_TEACHER_TARGETS and args.robust_steps > 0:
        checkpoint = robust_checkpoint(Path(args.cache).resolve(), checkpoint, paths["source"], steps=args.robust_steps,
                                       lr=ROBUST_LR, photometric=ROBUST_PHOTOMETRIC)
    pretraining_seconds = time.perf_counter() - pretraining_started  # about 0 when cached
    # refuses a folder whose runs adapted another teacher (the cache was emptied and pretrained again)
    claim({"teacher_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:16]})
    cfg = load_config(DEMO_CONFIG, {"model.checkpoint": str(checkpoint)})
    test_split = CocoSplit(paths["target_test"], paths["target_test"].parent / "images")

    print("[demo] direct evaluation of the pretrained model on the target test split ...", flush=True)
    direct_scores, direct_model = evaluate_checkpoint(cfg, test_split, None)
    quality = {"direct": pseudo_label_quality(direct_model, test_split, cfg=cfg)}
    results: dict[str, Any] = {"direct": {"seeds": {"-": direct_scores}}}

    variants = {name: VARIANTS[name] for name in VARIANTS if args.ablations or name == "ReSAM (full)"}
    adapted_model = None
    for name, overrides in variants.items():
        results[name] = {"seeds": {}, "training": {}}
        for seed in args.seeds:
            slug = name.split(" (")[0].replace("+ ", "plus-").replace(" ", "-").lower()
            run_dir = adapt(out / "runs" / f"{slug}-seed{seed}", checkpoint=checkpoint, shards=paths["shards"], seed=seed,
                            overrides=overrides, ranks=args.ranks, steps=steps)
            scores, model = evaluate_checkpoint(cfg, test_split, run_dir / "export" / "adapter")
            results[name]["seeds"][str(seed)] = scores
            results[name]["training"][str(seed)] = training_stats(run_dir)
            print(f"[demo]   {name} seed {seed}: mIoU {100 * scores['miou']:.2f}", flush=True)
            if name == "ReSAM (full)" and adapted_model is None:
                adapted_model = model
                quality["adapted (ReSAM, seed %d)" % seed] = pseudo_label_quality(model, test_split, cfg=cfg)

    rows: dict[str, dict[str, Any]] = {}
    for name, entry in results.items():
        seeds = list(entry["seeds"].values())
        rows[name] = {key: _mean_spread([s[key] for s in seeds]) for key in
                      ("miou", "f1", "precision", "recall", "miou_instances", "f1_instances", "miou_buildings",
                       "miou_sar_ships") if all(key in s for s in seeds)}
        rows[name]["n"] = len(seeds)
    table = format_table(rows)
    overlays = write_overlays(out / "overlays", direct_model, adapted_model, test_split, cfg, args.overlays) \
        if adapted_model is not None else []
    gain = rows["ReSAM (full)"]["miou"][0] - rows["direct"]["miou"][0]
    summary = {
        "table": {name: {key: value for key, value in row.items()} for name, row in rows.items()},
        "results": results, "pseudo_label_iou_on_test": quality,
        "resam_minus_direct_miou_points": 100 * gain, "overlays": overlays,
        "settings": vars(args) | settings | {"checkpoint": str(checkpoint)},
        "seconds": time.perf_counter() - started,
        "seconds_source_pretraining": pretraining_seconds,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    print()
    print(table)
    print()
    print("pseudo-label IoU against ground truth on the target test split (teacher masks, 1 point):")
    print("  (point_box: the teacher prompted with the boxes of its point-prompted masks, Requery without Refine;")
    print("   gt_box: the teacher prompted with ground-truth boxes, the ceiling of Requery)")
    for name, stages in quality.items():
        for kind in ("all",) + TARGET_KINDS:
            keys = {stage: stage if kind == "all" else f"{stage}_{kind}" for stage in QUALITY_STAGES}
            values = [f"{stage} {100 * stages[key]:6.2f}" for stage, key in keys.items() if key in stages]
            if not values:  # a kind this target does not have
                continue
            print(f"  {name if kind == 'all' else '':28s} {kind:10s} " + "  ".join(values))
    print(f"\nReSAM - direct: {100 * gain:+.2f} mIoU points; results in {out / 'results.json'}, "
          f"overlays in {out / 'overlays'}; {summary['seconds']:.0f} s in all, of which "
          f"{pretraining_seconds:.0f} s source pretraining (one-off: cached in {Path(args.cache).resolve()})")
    return 0
