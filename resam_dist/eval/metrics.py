"""Evaluation metrics: micro-imagewise mIoU/F1/precision/recall (SPEC "Evaluation") and COCO mask AP.

Micro-imagewise scores, as SPEC.md defines them (it attributes them to the paper and PointSAM; see
the instance means below for what PointSAM's code computes):

* per image, the K instance masks are stacked (prediction = logit > 0) and TP, FP and FN are
  counted over the whole K x H x W stack (pixel-instance pairs);
* IoU_img = TP / (TP + FP + FN), F1_img = 2TP / (2TP + FP + FN), precision_img = TP / (TP + FP),
  recall_img = TP / (TP + FN);
* mIoU, F1, precision and recall are the means of these over the evaluated images (not pooled
  over the data set: two images with IoU 1.0 and 0.0 give mIoU 0.5 whatever their sizes).

Instance-mean scores (`miou_instances`, `f1_instances`), reported beside them: per image, the mean
over its instances of each instance's own IoU (F1), then the mean over the evaluated images. This
is what the public PointSAM / WeSAM code computes: its `validate` passes one image's K x H x W
stack to segmentation_models_pytorch's `get_stats(mode="binary")`, which reads K as the batch
axis, and reduces with "micro-imagewise", which scores each batch item (instance) and averages
them. SPEC.md describes the pooled stack above as what PointSAM reports; it is not, and a large
instance outweighs a small one only in the pooled score. Differences that remain from the public
code: it thresholds logits at 0.5 (here 0) and scores on the padded S x S canvas (here at the
original resolution). An instance with tp + fp + fn = 0 scores 1 (smp's zero_division=1.0); it
only occurs for empty GT layers, which no reader here produces (empty GT masks are left out, and
`score_coco_results` leaves out empty unpaired results; a COCO object given to it directly is used
as it is, empty annotations included).

Zero-division rules:

* an image whose ground-truth stack has no foreground pixel (no GT instance, or only empty GT
  masks: TP + FN = 0) is **not evaluated**: it adds nothing to any mean and is counted in
  `skipped_images`. For every evaluated image the IoU, F1 and recall denominators are positive.
* an evaluated image with an empty prediction (TP + FP = 0) gets precision 0 (a model that
  predicts nothing earns no precision; its IoU, F1 and recall are 0 as well).

COCO mask AP/AP50/AP75 come from pycocotools' COCOeval(iouType="segm") with its default
parameters (IoU thresholds 0.50:0.95), except that AP counts up to max(100, the most results of
one image) detections per image instead of 100: dense scenes (HRSID, up to ~100 ships and more)
are not capped below AP 1 for perfect masks.

`score_coco_results` scores a COCO results list of any model with the micro-imagewise metrics; how
results are paired with ground-truth instances is described there.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

import resam_kernels
from resam_dist.data.batch import valid_from_counts
from resam_dist.data.coco import _is_int, segmentation_problem  # (the COCO reader's own checks)

SCORE_KEYS = ("miou", "f1", "precision", "recall")
"""Keys of the micro-imagewise scores (fractions in [0, 1])."""
INSTANCE_SCORE_KEYS = ("miou_instances", "f1_instances")
"""Keys of the instance-mean scores (fractions in [0, 1]; see the module docstring)."""
AP_KEYS = ("ap", "ap50", "ap75")
"""Keys of the COCO mask AP scores (fractions in [0, 1])."""


# --------------------------------------------------------------------------------------------
# Micro-imagewise scores
# --------------------------------------------------------------------------------------------

def instance_counts(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """TP, FP, FN of every instance mask: pred (bool masks or float logits, logit > 0 is
    foreground) and gt, both B x K x H x W -> B x K x 3 int64 (tp, fp, fn).

    On CUDA tensors a Triton kernel counts them in one read of pred and gt (logits thresholded in
    registers); elsewhere the torch reference (`resam_kernels.counts`, the specification)."""
    if pred.dim() != 4 or pred.shape != gt.shape:
        raise ValueError(f"pred and gt must both be B x K x H x W with equal shapes, got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    if not (pred.dtype == torch.bool or pred.is_floating_point()):
        raise ValueError(f"predictions must be bool masks or float logits, got dtype {pred.dtype}")
    return resam_kernels.instance_counts(pred, gt.bool(), use_triton=pred.is_cuda)


def batch_image_counts(pred: torch.Tensor, gt: torch.Tensor,
                       counts: torch.Tensor | None = None) -> torch.Tensor:
    """TP, FP, FN per image over the stack of its instance masks.

    pred: B x K x H x W bool masks or float logits (logit > 0 is foreground).
    gt:   B x K x H x W bool.
    counts: B int, valid instances per image (instances k >= counts[b] are padding and ignored);
    None: all K are valid.
    Returns B x 3 int64 (tp, fp, fn), on the device of the inputs.
    """
    per_instance = instance_counts(pred, gt)  # B x K x 3
    if counts is not None:
        valid = valid_from_counts(counts.to(pred.device), pred.shape[1])  # B x K
        per_instance = per_instance * valid[:, :, None]
    return per_instance.sum(dim=1)  # B x 3


def instance_means(per_instance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over its valid instances of each instance's IoU and F1.

    per_instance: B x K x 3 (tp, fp, fn); valid: B x K bool. Returns B x 2 float64 (iou, f1); an
    instance with tp + fp + fn = 0 scores 1, an image without a valid instance 0 (it is not
    evaluated: see the module docstring).
    """
    if per_instance.dim() != 3 or per_instance.shape[-1] != 3 or valid.shape != per_instance.shape[:2]:
        raise ValueError(f"per_instance must be B x K x 3 and valid B x K, got {tuple(per_instance.shape)} "
                         f"and {tuple(valid.shape)}")
    tp, fp, fn = per_instance.to(torch.float64).unbind(dim=-1)  # B x K each
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(tp))  # B x K
    f1 = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.ones_like(tp))
    weight = valid.to(torch.float64)  # B x K
    instances = weight.sum(dim=1).clamp(min=1)  # B
    return torch.stack([(iou * weight).sum(dim=1) / instances, (f1 * weight).sum(dim=1) / instances], dim=1)


def image_scores(pred: torch.Tensor, gt: torch.Tensor) -> tuple[int, int, int]:
    """TP, FP, FN of one image over its stack of instance masks.

    pred: K x H x W bool masks or float logits; gt: K x H x W bool. Returns Python ints.
    """
    if pred.dim() != 3:
        raise ValueError(f"pred must be K x H x W, got shape {tuple(pred.shape)}")
    tp, fp, fn = batch_image_counts(pred.unsqueeze(0), gt.unsqueeze(0))[0].tolist()
    return int(tp), int(fp), int(fn)


def scores_from_counts(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image IoU, F1, precision and recall from `counts` (... x 3: tp, fp, fn).

    Zero denominators give 0 (see the module docstring for which images are evaluated at all).
    Returns float64 tensors of shape `...` keyed "iou", "f1", "precision", "recall".
    """
    counts = counts.to(torch.float64)
    tp, fp, fn = counts.unbind(dim=-1)

    def ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        return torch.where(denominator > 0, numerator / safe, torch.zeros_like(numerator))

    return {
        "iou": ratio(tp, tp + fp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
    }


class ImagewiseMeter:
    """Streaming micro-imagewise mIoU/F1/precision/recall.

    The whole state is one float64 vector of sums and counts (`state`, fields in `FIELDS`), so
    ranks can combine their meters with one `all_reduce` (SUM) before `compute()`. Float64 keeps
    pixel counts exact up to 2**53.
    """

    FIELDS = ("iou_sum", "f1_sum", "precision_sum", "recall_sum",
              "images", "instances", "skipped_images", "tp", "fp", "fn",
              "instance_iou_sum", "instance_f1_sum", "instance_images")

    def __init__(self, device: torch.device | str | None = None):
        self.state = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    def _index(self, name: str) -> int:
        return self.FIELDS.index(name)

    def update_counts(self, counts: torch.Tensor, instances: torch.Tensor,
                      instance_scores: torch.Tensor | None = None) -> torch.Tensor:
        """Add images given their counts (B x 3: tp, fp, fn), GT instances (B) and, optionally,
        their instance-mean IoU and F1 (B x 2, `instance_means`). Images added without them
        leave `miou_instances` and `f1_instances` NaN in `compute()`.

        Returns B bool: which images were evaluated (the others have no GT foreground pixel).
        """
        counts = counts.to(self.state.device, torch.float64).reshape(-1, 3)  # B x 3
        instances = instances.to(self.state.device, torch.float64).reshape(-1)  # B
        evaluated = (counts[:, 0] + counts[:, 2]) > 0  # B: TP + FN > 0
        scores = scores_from_counts(counts)
        weight = evaluated.to(torch.float64)  # B
        if instance_scores is None:
            instance_scores = torch.zeros((counts.shape[0], 2), dtype=torch.float64, device=self.state.device)
            instance_weight = torch.zeros_like(weight)
        else:
            instance_scores = instance_scores.to(self.state.device, torch.float64).reshape(-1, 2)  # B x 2
            instance_weight = weight
        update = torch.stack([
            (scores["iou"] * weight).sum(),
            (scores["f1"] * weight).sum(),
            (scores["precision"] * weight).sum(),
            (scores["recall"] * weight).sum(),
            weight.sum(),
            (instances * weight).sum(),
            (1.0 - weight).sum(),
            (counts[:, 0] * weight).sum(),
            (counts[:, 1] * weight).sum(),
            (counts[:, 2] * weight).sum(),
            (instance_scores[:, 0] * instance_weight).sum(),
            (instance_scores[:, 1] * instance_weight).sum(),
            instance_weight.sum(),
        ])
        self.state += update
        return evaluated

    def update_instances(self, per_instance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Add images given the counts of each instance (B x K x 3: tp, fp, fn) and which
        instances are real (B x K bool). Returns the per-image counts, B x 3 int64."""
        image_counts = (per_instance * valid[:, :, None]).sum(dim=1)  # B x 3
        self.update_counts(image_counts, valid.sum(dim=1), instance_means(per_instance, valid))
        return image_counts

    def update(self, pred_masks: torch.Tensor, gt_masks: torch.Tensor,
               counts: torch.Tensor | None = None) -> torch.Tensor:
        """Add one image (K x H x W) or a batch (B x K x H x W, optional `counts` B).

        pred_masks: bool masks or float logits (logit > 0); gt_masks: bool.
        Returns the per-image counts, B x 3 int64 (tp, fp, fn); B = 1 for a single image.
        """
        if pred_masks.dim() == 3:
            if counts is not None:
                raise ValueError("counts only apply to batched B x K x H x W inputs")
            pred_masks, gt_masks = pred_masks.unsqueeze(0), gt_masks.unsqueeze(0)
        per_instance = instance_counts(pred_masks, gt_masks)  # B x K x 3
        num_images, num_instances = per_instance.shape[:2]
        if counts is None:
            valid = torch.ones((num_images, num_instances), dtype=torch.bool, device=per_instance.device)
        else:
            valid = valid_from_counts(counts.to(per_instance.device), num_instances)  # B x K
        return self.update_instances(per_instance, valid)

    def merge(self, other: "ImagewiseMeter") -> None:
        """Add the state of another meter (e.g. one gathered from another rank)."""
        self.state += other.state.to(self.state.device)

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state over all ranks (no-op when torch.distributed is not initialised)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.state, op=dist.ReduceOp.SUM, group=group)

    def state_dict(self) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self.FIELDS, self.state.tolist())}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """A `state_dict()`; one written before the instance means existed loads with none recorded
        (its miou_instances / f1_instances are NaN)."""
        state = {"instance_iou_sum": 0.0, "instance_f1_sum": 0.0, "instance_images": 0.0, **state}
        missing = [name for name in self.FIELDS if name not in state]
        if missing:
            raise ValueError(f"ImagewiseMeter state lacks fields {missing}")
        values = [float(state[name]) for name in self.FIELDS]
        self.state = torch.tensor(values, dtype=torch.float64, device=self.state.device)

    def compute(self) -> dict[str, float]:
        """Means over evaluated images plus counts.

        Keys: miou, f1, precision, recall (fractions; NaN with a warning when no image was
        evaluated), miou_instances, f1_instances (fractions; NaN as well when an evaluated image
        was added without its instance scores), images, instances, skipped_images (ints).
        """
        values = self.state_dict()
        images = int(round(values["images"]))
        result: dict[str, float] = {}
        for key, sum_name in zip(SCORE_KEYS, ("iou_sum", "f1_sum", "precision_sum", "recall_sum")):
            result[key] = values[sum_name] / images if images > 0 else math.nan
        every_image_has_instance_scores = images > 0 and int(round(values["instance_images"])) == images
        for key, sum_name in zip(INSTANCE_SCORE_KEYS, ("instance_iou_sum", "instance_f1_sum")):
            result[key] = values[sum_name] / images if every_image_has_instance_scores else math.nan
        if images == 0:
            warnings.warn("ImagewiseMeter.compute: no image was evaluated (no GT foreground); "
                          "scores are NaN", stacklevel=2)
        result["images"] = images
        result["instances"] = int(round(values["instances"]))
        result["skipped_images"] = int(round(values["skipped_images"]))
        return result


def micro_imagewise(per_image: Iterable[Sequence[int]]) -> dict[str, float]:
    """Micro-imagewise scores from per-image (tp, fp, fn) triples (instances are not counted)."""
    rows = [list(triple) for triple in per_image]
    meter = ImagewiseMeter()
    if rows:
        counts = torch.tensor(rows, dtype=torch.float64)  # B x 3
        meter.update_counts(counts, torch.zeros(len(rows)))
    result = meter.compute()
    return {key: result[key] for key in (*SCORE_KEYS, "images", "skipped_images")}


# --------------------------------------------------------------------------------------------
# COCO ground truth and results
# --------------------------------------------------------------------------------------------

def _read_json(path: Path, kind: str) -> Any:
    """JSON of `path`; ValueError naming the file when it is missing or malformed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: {kind} file not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {kind} file is not valid JSON ({err})") from None


def load_coco_gt(gt: str | Path | dict | COCO) -> COCO:
    """A pycocotools COCO object from a file path, a loaded dict or a COCO object.

    Every image needs integer id, height and width, every annotation integer id, image_id and
    category_id and a segmentation, every category an integer id, ids unique per list (else a
    ValueError naming the file and the entry). Annotations without `iscrowd` get 0 and without
    `area` get their mask area (COCOeval needs both). Annotations whose mask has no pixel are removed: no prompt can be sampled from them
    and no prediction can match them (resam_dist.data.coco leaves them out as well).
    Unreadable files raise ValueError naming the file.
    """
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, Path)):
        source = str(gt)
        dataset = _read_json(Path(gt), "ground-truth")
    elif isinstance(gt, dict):
        source = "<ground-truth dict>"
        dataset = copy.deepcopy(gt)
    else:
        raise ValueError(f"ground truth must be a path, a dict or a COCO object, got {type(gt).__name__}")
    if not isinstance(dataset, dict):
        raise ValueError(f"{source}: ground truth must be a JSON object, got {type(dataset).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"{source}: ground truth lacks the list '{key}'")
    _check_gt_entries(dataset, source)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    kept = []
    for ann in dataset["annotations"]:
        if ann.get("image_id") not in coco.imgs:
            raise ValueError(f"{source}: annotation {ann.get('id')} refers to unknown image "
                             f"{ann.get('image_id')}")
        try:
            pixels = float(mask_utils.area(coco.annToRLE(ann)))
        except Exception as err:  # pycocotools raises assorted errors on bad segmentations
            raise ValueError(f"{source}: annotation {ann.get('id')}: segmentation cannot be decoded "
                             f"({err})") from None
        if pixels == 0:
            continue
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", pixels)
        kept.append(ann)
    if len(kept) != len(dataset["annotations"]):
        dataset["annotations"] = kept
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    return coco


def _check_gt_entries(dataset: dict, source: str) -> None:
    """ValueError naming `source` and the entry for what pycocotools would fail on or mix up: an
    image without integer id, height and width, an annotation without integer id, image_id and
    category_id or without segmentation or with an 'iscrowd' other than 0 / 1, a category without
    integer id, and duplicate ids."""
    required = {"images": ("id", "height", "width"), "annotations": ("id", "image_id", "category_id"),
                "categories": ("id",)}
    for key, int_keys in required.items():
        seen: set[int] = set()
        for index, entry in enumerate(dataset[key]):
            where = f"{source}: {key}[{index}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
            for int_key in int_keys:
                if not _is_int(entry.get(int_key)):
                    raise ValueError(f"{where} needs an integer '{int_key}', got {entry.get(int_key)!r}")
            if key == "annotations" and "segmentation" not in entry:
                raise ValueError(f"{where} (id {entry['id']}) lacks 'segmentation'")
            crowd = entry.get("iscrowd", 0) if key == "annotations" else 0
            if crowd not in (0, 1):  # (pycocotools reads int(iscrowd); a string "0" is truthy here)
                raise ValueError(f"{where} (id {entry['id']}): 'iscrowd' must be 0 or 1, got {crowd!r}")
            if entry["id"] in seen:
                raise ValueError(f"{where}: duplicate {key[:-1]} id {entry['id']}")
            seen.add(entry["id"])


def _without_annotation_id_zero(coco_gt: COCO) -> COCO:
    """COCOeval records a match as the matched annotation's id, and an id of 0 as no match: the
    correct detections of an annotation with id 0 would count as false positives. Such a ground
    truth is given to COCOeval as a copy where that annotation has the id (largest id + 1); AP
    does not depend on annotation ids."""
    if 0 not in coco_gt.anns:
        return coco_gt
    dataset = copy.deepcopy(coco_gt.dataset)
    free_id = max(coco_gt.anns) + 1
    for ann in dataset["annotations"]:
        if ann["id"] == 0:
            ann["id"] = free_id
    renumbered = COCO()
    renumbered.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        renumbered.createIndex()
    return renumbered


def _check_result(result: Any, index: int, coco_gt: COCO, source: str) -> dict:
    """A validated copy of one result entry; ValueError naming `source` and the entry."""
    where = f"{source}: result #{index}"
    if not isinstance(result, dict):
        raise ValueError(f"{where} must be an object, got {type(result).__name__}")
    for key in ("image_id", "category_id", "segmentation", "score"):
        if key not in result:
            raise ValueError(f"{where} lacks the key '{key}'")
    for key in ("image_id", "category_id"):
        if isinstance(result[key], bool) or not isinstance(result[key], int):
            raise ValueError(f"{where}: {key} must be an integer, got {result[key]!r}")
    image_id = result["image_id"]
    if image_id not in coco_gt.imgs:
        raise ValueError(f"{where}: image_id {image_id!r} is not in the ground truth")
    if result["category_id"] not in coco_gt.cats:
        raise ValueError(f"{where}: category_id {result['category_id']!r} is not in the ground truth")
    score = result["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        raise ValueError(f"{where}: score must be a finite number, got {score!r}")
    segmentation = result["segmentation"]
    if not isinstance(segmentation, dict) or "size" not in segmentation or "counts" not in segmentation:
        raise ValueError(f"{where}: segmentation must be an RLE object with 'size' and 'counts'")
    image = coco_gt.imgs[image_id]
    if isinstance(segmentation["size"], tuple):
        segmentation = {**segmentation, "size": list(segmentation["size"])}
    # size [height, width] of the image, runs covering each of its pixels once
    problem = segmentation_problem(segmentation, image["height"], image["width"])
    if problem is not None:
        raise ValueError(f"{where} (image {image_id}): {problem}")
    size, counts = segmentation["size"], segmentation["counts"]
    if isinstance(counts, list):  # uncompressed RLE -> compressed
        segmentation = mask_utils.frPyObjects(segmentation, size[0], size[1])
    elif isinstance(counts, bytes):
        segmentation = {"size": size, "counts": counts}
    try:
        mask_utils.area(segmentation)
    except Exception as err:  # pycocotools raises assorted errors on corrupt RLE strings
        raise ValueError(f"{where}: segmentation RLE cannot be decoded ({err})") from None
    checked = {key: value for key, value in result.items() if key != "bbox"}
    checked["segmentation"] = segmentation
    checked["score"] = float(score)
    if "gt_id" in result and (isinstance(result["gt_id"], bool) or not isinstance(result["gt_id"], int)):
        raise ValueError(f"{where}: gt_id must be an integer annotation id, got {result['gt_id']!r}")
    return checked


def load_results(results: str | Path | list, coco_gt: COCO) -> list[dict]:
    """Validated copies of COCO instance-segmentation results (RLE masks).

    results: a JSON file path or a list of dicts with image_id, category_id, segmentation
    (RLE {size: [h, w], counts}), score and optionally gt_id. Any `bbox` is dropped (COCOeval
    recomputes it from the mask). Malformed files or entries raise ValueError naming the file
    and the entry.
    """
    if isinstance(results, (str, Path)):
        source = str(results)
        loaded = _read_json(Path(results), "results")
    else:
        source, loaded = "<results>", results
    if not isinstance(loaded, list):
        raise ValueError(f"{source}: results must be a JSON list of objects, got {type(loaded).__name__}")
    return [_check_result(entry, index, coco_gt, source) for index, entry in enumerate(loaded)]


def coco_mask_ap(gt: str | Path | dict | COCO, results: str | Path | list,
                 *, image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """COCO mask AP, AP50, AP75 (fractions) with pycocotools COCOeval(iouType="segm").

    image_ids restricts the evaluation to these images (default: all images of the GT).
    Empty results give 0.0 for all three with a warning. When the evaluated images hold no GT
    annotation, pycocotools has no AP (-1): NaN is returned with a warning.
    """
    coco_gt = load_coco_gt(gt)
    checked = load_results(results, coco_gt)
    if image_ids is not None:
        wanted = set(image_ids)
        checked = [entry for entry in checked if entry["image_id"] in wanted]
    if not checked:
        warnings.warn("coco_mask_ap: no results to evaluate; AP, AP50 and AP75 are 0", stacklevel=2)
        return {key: 0.0 for key in AP_KEYS}
    coco_gt = _without_annotation_id_zero(coco_gt)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(checked))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(set(image_ids))
        most_per_image = max(collections.Counter(entry["image_id"] for entry in checked).values())
        evaluator.params.maxDets = [1, 10, max(100, most_per_image)]
        evaluator.evaluate()
        evaluator.accumulate()
    # AP as COCOeval.summarize() computes it, at the last maxDets (summarize() itself reads its
    # AP over 0.50:0.95 at a fixed 100): the mean of the defined precisions (> -1)
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # IoU thresholds x recalls x categories, area "all"
    thresholds = evaluator.params.iouThrs

    def mean_defined(values: np.ndarray) -> float:
        defined = values[values > -1]
        return float(defined.mean()) if defined.size else -1.0

    stats = [mean_defined(precision), mean_defined(precision[np.isclose(thresholds, 0.5)]),
             mean_defined(precision[np.isclose(thresholds, 0.75)])]
    if any(value < 0 for value in stats):
        warnings.warn("coco_mask_ap: the evaluated images hold no ground-truth annotation; AP is NaN",
                      stacklevel=2)
    return {key: float(value) if value >= 0 else math.nan for key, value in zip(AP_KEYS, stats)}


# --------------------------------------------------------------------------------------------
# Micro-imagewise scores of a COCO results list
# --------------------------------------------------------------------------------------------

@dataclass
class ResultsScores:
    """Micro-imagewise scores of a results list and one row per image."""
    scores: dict[str, float]
    per_image: list[dict[str, Any]] = field(default_factory=list)
    matching: str = "gt_id"


def _decode(rles: list[dict], height: int, width: int) -> np.ndarray:
    """N x H x W bool masks from RLEs."""
    if not rles:
        return np.zeros((0, height, width), dtype=bool)
    with warnings.catch_warnings():  # pycocotools 2.0.x trips a numpy 2 copy-keyword deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = mask_utils.decode(rles)  # H x W x N uint8
    return np.ascontiguousarray(decoded.transpose(2, 0, 1)).astype(bool)


def score_coco_results(gt: str | Path | dict | COCO, results: str | Path | list,
                       *, image_ids: Sequence[int] | None = None) -> ResultsScores:
    """Micro-imagewise mIoU/F1/precision/recall of COCO results against the GT instances.

    Ground truth: the non-crowd, non-empty annotations of each image (crowd annotations are
    ignored, as resam_dist.data.coco does by default).
    Each GT instance is one layer of the image's stack; its prediction is the mask of the
    result paired with it, or an empty mask when none is. Pairing:

    * `gt_id` mode (every result carries `gt_id`, the GT annotation id it was prompted by, as
      resam-eval writes them): a result is paired with that annotation. The id must exist and
      belong to the result's image; two results naming the same gt_id raise ValueError.
      Results naming a crowd annotation are ignored.
    * best-IoU mode (no result carries `gt_id`): per image and category, results and GT
      instances are paired one-to-one by maximum total mask IoU (Hungarian assignment);
      pairs with IoU 0 stay unpaired.

    A result left unpaired adds all its pixels as false positives (a stack layer with an empty
    GT; in the instance-mean scores, an instance of IoU 0; an empty one adds nothing: no pixel, no
    instance). Mixing both modes in one list raises ValueError.
    """
    coco_gt = load_coco_gt(gt)
    checked = load_results(results, coco_gt)
    with_gt_id = sum("gt_id" in entry for entry in checked)
    if 0 < with_gt_id < len(checked):
        raise ValueError(f"results: {with_gt_id} of {len(checked)} results carry 'gt_id'; either all or "
                         "none must (none: results are paired with GT instances by best IoU)")
    use_gt_id = with_gt_id > 0
    chosen = sorted(coco_gt.imgs) if image_ids is None else list(image_ids)
    chosen_set = set(chosen)
    for image_id in chosen:
        if image_id not in coco_gt.imgs:
            raise ValueError(f"image id {image_id} is not in the ground truth")

    results_by_image: dict[int, list[dict]] = {image_id: [] for image_id in chosen}
    if use_gt_id:
        seen: dict[int, int] = {}
        for index, entry in enumerate(checked):
            gt_id = entry["gt_id"]
            if gt_id not in coco_gt.anns:
                raise ValueError(f"results: result #{index}: gt_id {gt_id} is not an annotation id of "
                                 "the ground truth")
            if coco_gt.anns[gt_id]["image_id"] != entry["image_id"]:
                raise ValueError(f"results: result #{index}: gt_id {gt_id} belongs to image "
                                 f"{coco_gt.anns[gt_id]['image_id']}, not to image {entry['image_id']}")
            if gt_id in seen:
                raise ValueError(f"results: results #{seen[gt_id]} and #{index} both name gt_id {gt_id}")
            seen[gt_id] = index
    for entry in checked:
        if entry["image_id"] in chosen_set:
            results_by_image[entry["image_id"]].append(entry)

    meter = ImagewiseMeter()
    per_image: list[dict[str, Any]] = []
    for image_id in chosen:
        image = coco_gt.imgs[image_id]
        height, width = image["height"], image["width"]
        gt_anns = [ann for ann in coco_gt.imgToAnns.get(image_id, []) if not ann.get("iscrowd", 0)]
        gt_masks = _decode([coco_gt.annToRLE(ann) for ann in gt_anns], height, width)  # K x H x W
        pred_masks = np.zeros_like(gt_masks)  # K x H x W
        image_results = results_by_image[image_id]
        unpaired_areas: list[int] = []  # pixels of each unpaired result
        if use_gt_id:
            layer_of = {ann["id"]: layer for layer, ann in enumerate(gt_anns)}
            for entry in image_results:
                layer = layer_of.get(entry["gt_id"])
                if layer is None:  # a crowd annotation: ignored
                    continue
                pred_masks[layer] = _decode([entry["segmentation"]], height, width)[0]
        else:
            categories = sorted({ann["category_id"] for ann in gt_anns}
                                | {entry["category_id"] for entry in image_results})
            for category in categories:
                gt_layers = [layer for layer, ann in enumerate(gt_anns) if ann["category_id"] == category]
                cat_results = [entry for entry in image_results if entry["category_id"] == category]
                if not cat_results:
                    continue
                result_rles = [entry["segmentation"] for entry in cat_results]
                paired: set[int] = set()
                if gt_layers:
                    gt_rles = [coco_gt.annToRLE(gt_anns[layer]) for layer in gt_layers]
                    ious = np.asarray(mask_utils.iou(result_rles, gt_rles, [0] * len(gt_rles)))
                    ious = ious.reshape(len(result_rles), len(gt_rles))  # R x G
                    rows, cols = linear_sum_assignment(ious, maximize=True)
                    for row, col in zip(rows, cols):
                        if ious[row, col] > 0:
                            pred_masks[gt_layers[col]] = _decode([result_rles[row]], height, width)[0]
                            paired.add(int(row))
                for row, rle in enumerate(result_rles):
                    if row not in paired:
                        unpaired_areas.append(int(mask_utils.area(rle)))
        layers = instance_counts(torch.from_numpy(pred_masks)[None], torch.from_numpy(gt_masks)[None])[0]  # K x 3
        # (an empty unpaired result adds no pixel to the stack, and no instance here)
        unpaired = torch.tensor([[0, area, 0] for area in unpaired_areas if area > 0], dtype=torch.int64).reshape(-1, 3)
        layers = torch.cat([layers, unpaired])  # (K + unpaired) x 3
        counts = layers.sum(dim=0, keepdim=True)  # 1 x 3
        means = instance_means(layers[None], torch.ones(1, len(layers), dtype=torch.bool))  # 1 x 2
        evaluated = bool(meter.update_counts(counts, torch.tensor([len(gt_anns)]), means)[0])
        tp, fp, fn = counts[0].tolist()
        row_scores = {key: float(value[0]) for key, value in scores_from_counts(counts).items()}
        per_image.append({"image_id": image_id, "file_name": image.get("file_name", ""),
                          "instances": len(gt_anns), "evaluated": evaluated,
                          "tp": tp, "fp": fp, "fn": fn, **row_scores,
                          "iou_instances": float(means[0, 0]), "f1_instances": float(means[0, 1])})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = meter.compute()
    if scores["images"] == 0:
        warnings.warn("score_coco_results: no image with ground-truth instances; scores are NaN",
                      stacklevel=2)
    return ResultsScores(scores=scores, per_image=per_image, matching="gt_id" if use_gt_id else "best_iou")
