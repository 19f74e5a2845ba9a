"""Point-prompted evaluation of a SAM model on a COCO split, and the `resam-eval` command.

Protocol (SPEC "Evaluation"), per image:

1. the image's instances are those `resam_dist.data.coco.CocoSplit.load` returns (crowd and
   empty annotations left out); an image without instances is skipped (not evaluated);
2. the image is resized so that its longest side is the model's image size S (bilinear with
   anti-aliasing, new side = int(side * S / longest + 0.5) as SAM does), SAM-normalised and
   zero-padded at the bottom/right to S x S;
3. for every instance, `num_points` positive and `num_points` negative points are sampled at the
   original resolution with `resam_dist.resam.prompts.sample_points`, from a generator seeded
   with `[seed, image_id]` and used instance by instance in annotation order: the prompts are
   identical across runs and across models. They are scaled to the canvas (x * w'/W, y * h'/H);
4. `model.decode` gives S x S logits per instance; they are cropped to the resized image area,
   resized back to H x W (bilinear on the logits) and thresholded at 0;
5. the K predicted masks are scored against the K GT masks at the original resolution with
   `resam_dist.eval.metrics` (micro-imagewise, and the instance means), and written as COCO results (RLE, score = the
   model's predicted IoU, `gt_id` = the prompting annotation) for mask AP.

`resam-eval` has two modes:

* model: `resam-eval --config C.json [--checkpoint RUN_DIR|ADAPTER_DIR|SAM.pth]
  [--split-annotations A.json --split-images DIR] [--points N] [--out scores.json]
  [--save-results results.json]` builds the model of the config, applies a LoRA adapter when
  one is found (see `load_model`) and evaluates it on the split (default: the config's test split);
* results: `resam-eval --gt GT.json --pred RESULTS.json [--out scores.json]` scores a COCO
  results file of any model (see `resam_dist.eval.metrics.score_coco_results` for how results
  are paired with GT instances).

Both print a table and write a JSON with `scores` (miou, f1, precision, recall, miou_instances,
f1_instances, ap, ap50, ap75 as fractions in [0, 1]; images, instances, skipped_images),
`settings` and `per_image` rows. miou_instances / f1_instances average each instance's own score
per image, as the public PointSAM code's metric does (`resam_dist.eval.metrics`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from resam_dist.data.coco import masks_to_rle
from resam_dist.durable import atomic_write_text
from resam_dist.eval.metrics import (
    AP_KEYS, SCORE_KEYS, ImagewiseMeter, coco_mask_ap, instance_counts, instance_means,
    score_coco_results, scores_from_counts,
)
from resam_dist.resam.prompts import sample_points

# the per-image scores of an image that is not evaluated (no ground-truth instance): zero counts
_NOT_EVALUATED_SCORES = {**{key: float(value[0])
                            for key, value in scores_from_counts(torch.zeros((1, 3), dtype=torch.int64)).items()},
                         "iou_instances": 0.0, "f1_instances": 0.0}

ADAPTER_SUBDIRS = ("export/adapter", "adapter")
"""Where a run directory may hold the exported LoRA adapter (relative to the run directory);
the trainer (resam_dist.train.engine) exports to `<output_dir>/export/adapter`."""


@dataclass
class EvalResult:
    """What `evaluate_model` returns."""
    scores: dict[str, float]
    """miou, f1, precision, recall, miou_instances, f1_instances, ap, ap50, ap75 (fractions), images,
    instances, skipped_images."""
    coco_results: list[dict[str, Any]] = field(default_factory=list)
    """One COCO result per evaluated instance: image_id, category_id, segmentation (RLE),
    score (predicted IoU), gt_id (the annotation that prompted it)."""
    per_image: list[dict[str, Any]] = field(default_factory=list)
    """One row per image: image_id, file_name, instances, evaluated, tp, fp, fn, iou, f1,
    precision, recall, iou_instances, f1_instances."""
    meter: ImagewiseMeter | None = None
    """The micro-imagewise sums behind `scores`: ranks that evaluated different images can
    `meter.all_reduce()` and `meter.compute()` the scores of the whole split."""


@dataclass
class _Prepared:
    """One image ready for the model (canvas on the device, masks and prompts on the CPU)."""
    image_id: int
    file_name: str
    canvas: torch.Tensor          # 3 x S x S float32, SAM-normalised, zero-padded
    resized_hw: tuple[int, int]   # (h', w') of the image inside the canvas
    original_hw: tuple[int, int]  # (H, W)
    gt_masks: np.ndarray          # K x H x W bool
    instance_ids: np.ndarray      # K int64
    category_ids: np.ndarray      # K int64
    points: torch.Tensor          # K x 2N x 2 float32 (x, y) on the canvas, N positives then N negatives
    point_labels: torch.Tensor    # K x 2N int64 (1 positive, 0 negative)


def resized_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """(h', w') with the longest side equal to `image_size` (SAM's rounding, at least 1 pixel;
    the same sizes as the training pipeline, resam_dist.data.pipeline)."""
    scale = image_size / max(height, width)
    return max(int(height * scale + 0.5), 1), max(int(width * scale + 0.5), 1)


def prepare_canvas(image: np.ndarray, image_size: int, device: torch.device | str) -> tuple[torch.Tensor, tuple[int, int]]:
    """H x W x 3 uint8 -> (3 x S x S float32 SAM-normalised, zero-padded canvas; (h', w'))."""
    from resam_dist.model.build import normalise_pixels

    height, width = image.shape[:2]
    new_h, new_w = resized_shape(height, width, image_size)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).to(device)  # H x W x 3 uint8 (a writable copy)
    pixels = pixels.permute(2, 0, 1).unsqueeze(0).float()  # 1 x 3 x H x W
    if (new_h, new_w) != (height, width):
        pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=True)  # 1 x 3 x h' x w'
    pixels = normalise_pixels(pixels)
    canvas = F.pad(pixels, (0, image_size - new_w, 0, image_size - new_h))  # 1 x 3 x S x S
    return canvas[0], (new_h, new_w)


def sample_prompts(masks: np.ndarray, num_points: int, *, seed: int, image_id: int,
                   original_hw: tuple[int, int], resized_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded prompts of K instances, scaled to the canvas.

    masks: K x H x W bool (non-empty). Returns (points K x 2N x 2 float32, labels K x 2N int64).
    """
    # numpy seeds must be non-negative: negative COCO image ids are taken modulo 2^64 (as the shards do)
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, image_id & 0xFFFFFFFFFFFFFFFF])
    num_instances = masks.shape[0]
    points = np.zeros((num_instances, 2 * num_points, 2), dtype=np.float32)  # K x 2N x 2
    for k in range(num_instances):
        positives, negatives = sample_points(masks[k], num_points, rng)
        points[k, :num_points] = positives
        points[k, num_points:] = negatives
    (height, width), (new_h, new_w) = original_hw, resized_hw
    points[..., 0] *= new_w / width
    points[..., 1] *= new_h / height
    labels = np.zeros((num_instances, 2 * num_points), dtype=np.int64)  # K x 2N
    labels[:, :num_points] = 1
    return torch.from_numpy(points), torch.from_numpy(labels)


def _prepare(split: Any, image_id: int, *, image_size: int, num_points: int, seed: int,
             device: torch.device) -> _Prepared | None:
    loaded = split.load(image_id)
    if loaded is None:  # skip_bad split: an unreadable image, recorded by the split
        return None
    canvas, resized_hw = prepare_canvas(loaded.image, image_size, device)
    original_hw = tuple(loaded.image.shape[:2])
    points, labels = sample_prompts(loaded.masks, num_points, seed=seed, image_id=int(image_id),
                                    original_hw=original_hw, resized_hw=resized_hw)
    return _Prepared(image_id=int(image_id), file_name=loaded.file_name, canvas=canvas,
                     resized_hw=resized_hw, original_hw=original_hw, gt_masks=loaded.masks,
                     instance_ids=loaded.instance_ids, category_ids=loaded.category_ids,
                     points=points, point_labels=labels)


def _run_batch(model: Any, batch: list[_Prepared], *, max_instances: int, device: torch.device,
               autocast_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits B x K x S x S float32, iou B x K) for a batch of prepared images."""
    num_images = len(batch)
    num_instances = max(item.points.shape[0] for item in batch)
    prompt_len = batch[0].points.shape[1]
    images = torch.stack([item.canvas for item in batch])  # B x 3 x S x S
    points = torch.zeros(num_images, num_instances, prompt_len, 2)  # B x K x 2N x 2
    labels = torch.full((num_images, num_instances, prompt_len), -1, dtype=torch.int64)  # B x K x 2N
    counts = torch.zeros(num_images, dtype=torch.int64)  # B
    for b, item in enumerate(batch):
        k = item.points.shape[0]
        points[b, :k] = item.points
        labels[b, :k] = item.point_labels
        counts[b] = k
    points, labels, counts = points.to(device), labels.to(device), counts.to(device)
    if autocast_dtype is None:
        precision = contextlib.nullcontext()
    else:
        precision = torch.autocast(device_type=device.type, dtype=autocast_dtype)
    with precision:
        features = model.encode(images)
        logits, iou = model.decode(features, counts, points, labels, max_instances=max_instances)
    return logits.float(), iou.float()


def canvas_logits_to_masks(logits: torch.Tensor, resized_hw: tuple[int, int],
                           original_hw: tuple[int, int]) -> torch.Tensor:
    """Masks at the original resolution from logits on the model canvas.

    logits: k x S x S. The resized image area (top-left h' x w') is cropped, resized to H x W
    (bilinear on the logits) and thresholded at 0. Returns k x H x W bool.
    """
    new_h, new_w = resized_hw
    cropped = logits[:, :new_h, :new_w].unsqueeze(0).float()  # 1 x k x h' x w'
    resized = F.interpolate(cropped, size=tuple(original_hw), mode="bilinear",
                            align_corners=False)  # 1 x k x H x W
    return resized[0] > 0  # k x H x W


def _score_image(item: _Prepared, logits: torch.Tensor, iou: torch.Tensor, *, chunk: int,
                 device: torch.device) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Counts of each instance (K x 3: tp, fp, fn) and COCO results of one image.

    logits: K' x S x S (K' >= K, padding beyond K), iou: K'. Instances are resized back in chunks
    of `chunk` so memory stays at chunk x H x W.
    """
    num_instances = item.gt_masks.shape[0]
    counts = []  # chunks of k x 3
    results: list[dict[str, Any]] = []
    for start in range(0, num_instances, chunk):
        stop = min(start + chunk, num_instances)
        pred = canvas_logits_to_masks(logits[start:stop], item.resized_hw, item.original_hw)  # k x H x W
        gt = torch.from_numpy(item.gt_masks[start:stop]).to(device)  # k x H x W
        counts.append(instance_counts(pred.unsqueeze(0), gt.unsqueeze(0))[0])
        rles = masks_to_rle(pred.cpu().numpy())
        scores = iou[start:stop].tolist()
        for offset, rle in enumerate(rles):
            k = start + offset
            results.append({"image_id": item.image_id, "category_id": int(item.category_ids[k]),
                            "segmentation": rle, "score": float(scores[offset]),
                            "gt_id": int(item.instance_ids[k])})
    return torch.cat(counts), results


def evaluate_model(model: Any, split: Any, *, num_points: int, seed: int = 1337, batch_size: int = 4,
                   device: torch.device | str | None = None, max_instances: int = 50,
                   image_ids: Sequence[int] | None = None, autocast_dtype: torch.dtype | None = None,
                   compute_ap: bool = True, progress: bool = False) -> EvalResult:
    """Point-prompted micro-imagewise scores and COCO mask AP of `model` on `split`.

    model: a PromptableSam (encode/decode, image_size); moved to `device` and put in eval mode
    for the call (its previous train/eval mode is restored afterwards). split: a
    resam_dist.data.coco.CocoSplit. image_ids: evaluate these images only (default: all of the
    split; e.g. a rank's shard). autocast_dtype: e.g. torch.bfloat16 on CUDA (default fp32).
    compute_ap: COCO mask AP from the split's annotation file (ap/ap50/ap75 are NaN otherwise).
    """
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    chosen = list(split.image_ids) if image_ids is None else [int(i) for i in image_ids]
    was_training = model.training
    model.to(device)
    model.eval()
    meter = ImagewiseMeter(device=device)
    coco_results: list[dict[str, Any]] = []
    per_image: dict[int, dict[str, Any]] = {}
    evaluated_ids: list[int] = []
    started = time.perf_counter()

    def flush(batch: list[_Prepared]) -> None:
        logits, iou = _run_batch(model, batch, max_instances=max_instances, device=device,
                                 autocast_dtype=autocast_dtype)
        for b, item in enumerate(batch):
            per_instance, results = _score_image(item, logits[b], iou[b], chunk=max_instances, device=device)
            counts = per_instance.sum(dim=0, keepdim=True)  # 1 x 3
            means = instance_means(per_instance[None], torch.ones((1, per_instance.shape[0]), dtype=torch.bool,
                                                                  device=per_instance.device))  # 1 x 2
            meter.update_counts(counts, torch.tensor([item.gt_masks.shape[0]]), means)
            coco_results.extend(results)
            evaluated_ids.append(item.image_id)
            row_scores = {key: float(value[0]) for key, value in scores_from_counts(counts).items()}
            iou_instances, f1_instances = means[0].tolist()
            tp, fp, fn = counts[0].tolist()
            per_image[item.image_id] = {"image_id": item.image_id, "file_name": item.file_name,
                                        "instances": int(item.gt_masks.shape[0]), "evaluated": True,
                                        "tp": tp, "fp": fp, "fn": fn, **row_scores,
                                        "iou_instances": iou_instances, "f1_instances": f1_instances}

    # the model's device is current for the call (Triton kernels launch on the current device)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    try:
        with torch.no_grad(), on_device:
            pending: list[_Prepared] = []
            for index, image_id in enumerate(chosen):
                item = _prepare(split, image_id, image_size=model.image_size, num_points=num_points,
                                seed=seed, device=device)
                if item is None or item.gt_masks.shape[0] == 0:
                    meter.update_counts(torch.zeros(1, 3), torch.zeros(1))  # skipped
                    info = split.image_info(image_id)
                    per_image[int(image_id)] = {"image_id": int(image_id), "file_name": info["file_name"],
                                                "instances": 0, "evaluated": False, "tp": 0, "fp": 0, "fn": 0,
                                                **_NOT_EVALUATED_SCORES}  # (the keys of evaluated rows)
                    continue
                pending.append(item)
                if len(pending) == batch_size:
                    flush(pending)
                    pending = []
                if progress and (index + 1) % 50 == 0:
                    print(f"resam-eval: {index + 1}/{len(chosen)} images", file=sys.stderr, flush=True)
            if pending:
                flush(pending)
    finally:
        model.train(was_training)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores: dict[str, float] = meter.compute()
    if scores["images"] == 0:
        warnings.warn("evaluate_model: no image with instances was evaluated; scores are NaN", stacklevel=2)
    if compute_ap and evaluated_ids:
        scores.update(coco_mask_ap(split.annotation_file, coco_results, image_ids=evaluated_ids))
    else:
        scores.update({key: math.nan for key in AP_KEYS})
    scores["seconds"] = time.perf_counter() - started
    rows = [per_image[int(image_id)] for image_id in chosen if int(image_id) in per_image]
    return EvalResult(scores=scores, coco_results=coco_results, per_image=rows, meter=meter)


# --------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------

def _is_adapter_dir(path: Path) -> bool:
    """A folder written by resam_dist.model.lora.save_adapter (peft layout)."""
    return path.is_dir() and (path / "adapter_config.json").is_file()


def find_adapter(checkpoint: Path) -> Path | None:
    """The adapter folder of `checkpoint`: itself, or one of ADAPTER_SUBDIRS of a run directory."""
    if _is_adapter_dir(checkpoint):
        return checkpoint
    for sub in ADAPTER_SUBDIRS:
        if _is_adapter_dir(checkpoint / sub):
            return checkpoint / sub
    return None


def load_model(cfg: Any, checkpoint: str | Path | None = None) -> tuple[Any, str]:
    """The model to evaluate and a description of what was loaded.

    cfg: a resam_dist.config.Config. checkpoint:
    * None: the base model of the config (`model.name`, `model.checkpoint`; without a checkpoint
      the random initialisation is seeded with `train.seed`, as the trainer does, so an adapter
      trained on a randomly initialised base finds the same base here);
    * a file: a full SAM checkpoint in the official layout, replacing `model.checkpoint`;
    * a folder holding an adapter (`adapter_config.json` from save_adapter), or a run directory
      with one in `adapter/` (or another of ADAPTER_SUBDIRS): the base model plus that adapter.
    Anything else raises ValueError naming the path.
    """
    from resam_dist.model.build import build_sam

    def base_model() -> Any:
        return build_sam(cfg.model.name, cfg.model.checkpoint, seed=cfg.train.seed, attention=cfg.model.attention)

    if checkpoint is None:
        return base_model(), f"base {cfg.model.name}"
    path = Path(checkpoint)
    if path.is_file():
        return build_sam(cfg.model.name, path, attention=cfg.model.attention), f"SAM checkpoint {path}"
    if not path.exists():
        raise ValueError(f"--checkpoint {path}: no such file or folder")
    adapter = find_adapter(path)
    if adapter is None:
        raise ValueError(f"--checkpoint {path}: no LoRA adapter found (looked for adapter_config.json in "
                         f"{path} and in its subfolders {list(ADAPTER_SUBDIRS)})")
    from resam_dist.model import lora

    model = lora.load_adapter(base_model(), adapter)
    return model, f"base {cfg.model.name} + adapter {adapter}"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

TABLE_ROWS = (("mIoU", "miou"), ("F1", "f1"), ("precision", "precision"), ("recall", "recall"),
              ("mIoU inst-mean", "miou_instances"), ("F1 inst-mean", "f1_instances"),
              ("AP", "ap"), ("AP50", "ap50"), ("AP75", "ap75"))


def format_table(scores: dict[str, float]) -> str:
    """Scores as a two-column table (percentages for the scores, counts as integers)."""
    lines = [f"{'metric':<16}{'value':>10}", "-" * 26]
    for label, key in TABLE_ROWS:
        value = scores.get(key, math.nan)
        shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"
        lines.append(f"{label:<16}{shown:>10}")
    for label, key in (("images", "images"), ("instances", "instances"), ("skipped images", "skipped_images")):
        lines.append(f"{label:<16}{int(scores.get(key, 0)):>10d}")
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """NaN -> None so the JSON file stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value


def _write_json(path: Path, payload: Any) -> None:
    """Atomically: a report cut short (a full disk, a kill) never replaces an earlier one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_json_ready(payload), indent=1))


# flag -> argparse attribute of the model-mode options (refused in results mode)
_MODEL_MODE_FLAGS = {"--checkpoint": "checkpoint", "--split-annotations": "split_annotations",
                     "--split-images": "split_images", "--points": "points", "--seed": "seed",
                     "--batch-size": "batch_size", "--device": "device", "--bf16": "bf16",
                     "--max-images": "max_images", "--save-results": "save_results"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resam-eval",
        description="Micro-imagewise mIoU/F1/precision/recall and COCO mask AP, either of a model "
                    "(--config) on a COCO split or of a COCO results file (--gt/--pred).")
    model = parser.add_argument_group("model mode")
    model.add_argument("--config", help="run config (JSON); its model, eval and data sections are used")
    model.add_argument("--checkpoint", help="run directory or adapter directory (LoRA, from training), or a "
                                            "SAM checkpoint file; default: the config's base model")
    model.add_argument("--split-annotations", help="COCO JSON of the split (default: data.test_annotations)")
    model.add_argument("--split-images", help="image folder of the split (default: data.test_images)")
    model.add_argument("--points", type=int, help="positive (and negative) points per instance "
                                                  "(default: eval.num_points)")
    model.add_argument("--seed", type=int, help="prompt seed (default: eval.seed)")
    model.add_argument("--batch-size", type=int, help="images per forward (default: eval.batch_size)")
    model.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    model.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    model.add_argument("--max-images", type=int, help="evaluate only the first N images of the split")
    model.add_argument("--save-results", help="also write the COCO results (RLE masks) to this file")
    results = parser.add_argument_group("results mode")
    results.add_argument("--gt", help="ground-truth COCO JSON")
    results.add_argument("--pred", help="COCO results JSON (list of {image_id, category_id, segmentation "
                                        "RLE, score[, gt_id]})")
    parser.add_argument("--out", help="write scores, settings and per-image rows to this JSON file")
    return parser


def _main_results(args: argparse.Namespace) -> dict[str, Any]:
    scored = score_coco_results(args.gt, args.pred)
    scores: dict[str, Any] = dict(scored.scores)
    scores.update(coco_mask_ap(args.gt, args.pred))
    settings = {"mode": "results", "gt": str(args.gt), "pred": str(args.pred), "matching": scored.matching}
    return {"scores": scores, "settings": settings, "per_image": scored.per_image}


def _main_model(args: argparse.Namespace) -> dict[str, Any]:
    from resam_dist.config import load_config
    from resam_dist.data.coco import CocoSplit

    cfg = load_config(args.config)
    annotations = args.split_annotations or cfg.data.test_annotations
    images = args.split_images or cfg.data.test_images
    if not annotations or not images:
        raise ValueError(f"{args.config}: no evaluation split: set data.test_annotations and data.test_images "
                         "or pass --split-annotations and --split-images")
    num_points = args.points if args.points is not None else cfg.eval.num_points
    if num_points not in (1, 2, 3):
        raise ValueError(f"--points must be 1, 2 or 3, got {num_points}")
    seed = args.seed if args.seed is not None else cfg.eval.seed
    batch_size = args.batch_size if args.batch_size is not None else cfg.eval.batch_size
    for flag, value, least in (("--max-images", args.max_images, 1), ("--batch-size", args.batch_size, 1),
                               ("--seed", args.seed, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
    split = CocoSplit(annotations, images)
    image_ids = split.image_ids if args.max_images is None else split.image_ids[:args.max_images]
    model, loaded = load_model(cfg, args.checkpoint)
    device = torch.device(args.device) if args.device else None
    result = evaluate_model(model, split, num_points=num_points, seed=seed, batch_size=batch_size,
                            device=device, max_instances=cfg.data.max_instances, image_ids=image_ids,
                            autocast_dtype=torch.bfloat16 if args.bf16 else None, progress=True)
    if args.save_results:
        _write_json(Path(args.save_results), result.coco_results)
    settings = {"mode": "model", "config": str(args.config), "model": loaded,
                "checkpoint": None if args.checkpoint is None else str(args.checkpoint),
                "annotations": str(annotations), "images": str(images), "num_points": num_points,
                "seed": seed, "batch_size": batch_size, "max_instances": cfg.data.max_instances,
                "bf16": bool(args.bf16)}
    return {"scores": result.scores, "settings": settings, "per_image": result.per_image}


def main(argv: list[str] | None = None) -> int:
    """resam-eval entry point; returns the exit status (2 for usage or input errors)."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results_mode = args.gt is not None or args.pred is not None
    if results_mode and args.config is not None:
        parser.error("use either --config (model mode) or --gt/--pred (results mode), not both")
    if results_mode and (args.gt is None or args.pred is None):
        parser.error("results mode needs both --gt and --pred")
    if not results_mode and args.config is None:
        parser.error("give --config (model mode) or --gt and --pred (results mode)")
    if results_mode:
        ignored = [flag for flag, value in _MODEL_MODE_FLAGS.items() if getattr(args, value) not in (None, False)]
        if ignored:
            parser.error(f"{', '.join(ignored)}: model-mode option(s), which results mode (--gt/--pred) does not use")
    try:
        report = _main_results(args) if results_mode else _main_model(args)
        print(format_table(report["scores"]))
        if args.out:
            _write_json(Path(args.out), report)
            print(f"wrote {args.out}")
    except (ValueError, OSError) as err:
        print(f"resam-eval: error: {err}", file=sys.stderr)
        return 2
    return 0
