"""One ReSAM training step on one rank: weak -> Refine -> Requery -> strong -> loss (SPEC "The method").

The trainer pattern is

    result = engine(batch=batch, step_state=queue)    # TrainStepModule.forward calls resam_step(sam, ...)
    engine.backward(result["loss"]); engine.step()
    queue.push_all_ranks(result["weak_embeddings"])   # after the loss: step t sees the queue of t-1

`model` is the `PromptableSam` (LoRA applied) that the DeepSpeed engine wraps through
`resam_dist.train.engine.TrainStepModule`: only `model.encode` and `model.decode` are called.
The teacher is the same network, run without gradient on the weak view (LoRA active; with
`resam.teacher_ema`, the moving average of the LoRA weights, through `teacher_weights`); the
student runs with gradient on the strong view.

Methods (`cfg.resam.method`):
- `resam`: targets from Refine (if `resam.refine`) and Requery (if `resam.requery`); without Refine
  the point-prompted masks take its place (their boxes are requeried); SSA with weight
  `resam.ssa_weight`.
- `selftrain`: targets = the teacher's point-prompted masks (logit > 0); no Refine/Requery/SSA.
- `supervised`: targets = the ground-truth masks; no teacher pass, no SSA.
- `pointsam` is the separate PointSAM-style baseline, not run by this step.

Loss = focal_weight * focal + dice + iou_mse + ssa_weight * ssa, each mask term averaged over the
valid instances (see `resam_dist.resam.losses`). Everything is computed in float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from resam_dist.config import Config
from resam_dist.data.batch import Batch, valid_from_counts
from resam_dist.eval.metrics import instance_counts, scores_from_counts
from resam_dist.resam.losses import box_embeddings, mask_losses, ssa_loss
from resam_dist.resam.prompts import masks_to_boxes
from resam_dist.resam.queue import EmbeddingQueue
from resam_dist.resam.refine import refine
from resam_dist.resam.requery import apply_empty_policy, pseudo_labels, requery

STEP_METHODS = ("resam", "selftrain", "supervised")


@dataclass
class StepResult:
    loss: torch.Tensor                # scalar float32 with gradient (LoRA weights)
    parts: dict[str, torch.Tensor]    # detached scalars: focal, dice, iou_mse, ssa, total (unweighted terms)
    weak_embeddings: torch.Tensor     # M x C float32, detached, L2-normalised weak-view embeddings of the
                                      # instances used by SSA, image-major then instance order (M may be 0)
    stats: dict[str, float]           # monitoring values, see `resam_step`


def select_points(points: torch.Tensor, point_labels: torch.Tensor,
                  num_points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `num_points` positives and negatives of B x K x P x 2 points laid out as P/2
    positives then P/2 negatives (the identity when P = 2 * num_points)."""
    per_sign = points.shape[2] // 2
    if points.shape[2] % 2 or per_sign < num_points:
        raise ValueError(f"batch.points holds {points.shape[2]} points per instance; data.num_points = "
                         f"{num_points} needs {num_points} positives then {num_points} negatives")
    index = torch.cat([torch.arange(num_points), per_sign + torch.arange(num_points)]).to(points.device)  # 2N
    return points[:, :, index], point_labels[:, :, index]


def _mean_image_iou(pred: torch.Tensor, gt: torch.Tensor, instances: torch.Tensor) -> torch.Tensor:
    """Micro-imagewise IoU (SPEC "Evaluation") over the instances selected by `instances` (B x K):
    per image TP/FP/FN over its stack, mean over images with ground-truth foreground (NaN if none).
    pred: B x K x S x S bool masks or float logits (foreground: logit > 0)."""
    counts = (instance_counts(pred, gt) * instances[:, :, None]).sum(dim=1)  # B x 3
    evaluated = (counts[:, 0] + counts[:, 2]) > 0  # B
    iou = scores_from_counts(counts)["iou"]  # B float64
    return (iou * evaluated).sum() / evaluated.sum()


def _teacher_targets(model, batch: Batch, cfg: Config, gt_masks: torch.Tensor, real: torch.Tensor,
                     points: torch.Tensor, point_labels: torch.Tensor, monitored: dict[str, torch.Tensor], *,
                     min_chunks: int, monitor_ious: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The student's targets: (pseudo B x K x S x S bool, valid B x K bool, weak-view features
    B x C x h x w or None for "supervised"). The teacher (same network, no gradient, weak view)
    decodes the point prompts; then, by method, Refine and Requery. Adds the stage IoUs to
    `monitored` when `monitor_ious`. A function of its own so that the teacher's S x S logits and masks (point,
    refined: 200 MiB of bool each in the ViT-B step) are freed before the student's forward."""
    settings = cfg.resam
    use_kernels = cfg.kernels.enabled
    max_instances = cfg.data.max_instances
    counts = batch.counts
    weak_features = None

    def monitor_iou(name: str, pred: torch.Tensor, instances: torch.Tensor) -> None:
        if monitor_ious:
            monitored[name] = _mean_image_iou(pred, gt_masks, instances)

    if settings.method == "supervised":
        pseudo, valid = gt_masks & real[:, :, None, None], real
    else:
        with torch.no_grad():
            weak_features = model.encode(batch.weak)  # B x C x h x w
            teacher_logits, _ = model.decode(weak_features, counts, points, point_labels,
                                             max_instances=max_instances, min_chunks=min_chunks)  # B x K x S x S
        point_masks = (teacher_logits > 0) & real[:, :, None, None]  # B x K x S x S
        monitor_iou("iou_point", point_masks, real)
        if settings.method == "selftrain":
            pseudo, valid = point_masks, real
        else:
            # ---- Refine ---------------------------------------------------------------------
            if settings.refine:
                refined = refine(teacher_logits, counts, eps=settings.entropy_eps, mode=settings.overlap_mode,
                                 use_kernels=use_kernels)
                candidates, boxes, empty = refined.masks, refined.boxes, refined.empty
                monitor_iou("iou_refined", candidates, real)
                monitored["empty_refined"] = empty.sum()
            else:  # the point-prompted masks stand in for the refined ones
                candidates, boxes = point_masks, masks_to_boxes(point_masks)  # B x K x S x S, B x K x 4
                empty = real & ~point_masks.flatten(2).any(dim=2)  # B x K
            del teacher_logits
            # ---- Requery --------------------------------------------------------------------
            if settings.requery:
                requery_logits = requery(model, weak_features, boxes, counts, max_instances=max_instances,
                                         min_chunks=min_chunks)  # B x K x S x S
                monitor_iou("iou_requery", requery_logits, real)  # logit > 0
                pseudo, valid = pseudo_labels(point_masks, requery_logits, empty, counts,
                                              empty_policy=settings.empty_policy)
                del requery_logits
            else:
                pseudo, valid = apply_empty_policy(candidates, point_masks, empty, counts,
                                                   empty_policy=settings.empty_policy)
        monitor_iou("iou_pseudo", pseudo, valid)
    return pseudo, valid, weak_features


def resam_step(model, batch: Batch, queue: EmbeddingQueue, cfg: Config, *, min_chunks: int = 1,
               teacher_weights: Callable[[], contextlib.AbstractContextManager] | None = None,
               monitor_ious: bool = True) -> StepResult:
    """One forward of the ReSAM objective; the caller runs backward, the optimizer and the queue push.

    min_chunks: passed to every `decode` (under ZeRO-3 all ranks must make the same number of
    decoder calls: give the maximum over ranks of ceil(K / data.max_instances)).
    teacher_weights: a context the teacher's passes (encode, decode, Refine, Requery) run in, e.g.
    `resam_dist.train.ema.EmaTeacher.weights` (None: the current weights).

    stats (floats): n_instances (real instances), n_valid (instances with a target), n_ssa
    (instances in SSA), kept_fraction (n_valid / n_instances), and when the stage ran:
    empty_refined (real instances whose refined mask is empty), and micro-imagewise IoU against
    batch.gt_masks of the point-prompted teacher masks (iou_point), refined masks (iou_refined),
    requeried masks (iou_requery), all over the real instances, and of the final targets over the
    valid instances (iou_pseudo). An IoU key is left out when no image of the batch has GT
    foreground (e.g. a batch of empty tiles): stats never hold NaN. `monitor_ious=False` leaves
    all four out and skips their computation (the trainer monitors only the micro-batches of
    rank 0 whose step it logs; they cost about 1 ms of a 114 ms step on an H200, run 9).
    """
    settings = cfg.resam
    if settings.method not in STEP_METHODS:
        raise ValueError(f"{cfg.source or '<config>'}: resam.method '{settings.method}' is not run by "
                         f"resam_step (methods: {STEP_METHODS})")
    use_kernels = cfg.kernels.enabled
    max_instances = cfg.data.max_instances
    counts = batch.counts
    gt_masks = batch.gt_masks.bool()  # B x K x S x S
    real = valid_from_counts(counts, gt_masks.shape[1])  # B x K
    points, point_labels = select_points(batch.points, batch.point_labels, cfg.data.num_points)
    monitored: dict[str, torch.Tensor] = {}

    # ---- teacher targets (their intermediate S x S masks are freed before the student runs) ----
    with teacher_weights() if teacher_weights is not None else contextlib.nullcontext():
        pseudo, valid, weak_features = _teacher_targets(model, batch, cfg, gt_masks, real, points, point_labels,
                                                        monitored, min_chunks=min_chunks, monitor_ious=monitor_ious)

    # ---- student: gradient, strong view, the same point prompts -----------------------------
    strong_features = model.encode(batch.strong)  # B x C x h x w
    # low-res logits (B x K x S/4 x S/4): the loss upsamples them itself, without S x S logits
    student_logits, student_iou = model.decode(strong_features, counts, points, point_labels,
                                               max_instances=max_instances, min_chunks=min_chunks, upsample=False)
    focal, dice, iou_mse = mask_losses(student_logits, student_iou, pseudo, valid, low_res=True,
                                       recompute=cfg.train.activation_checkpointing in ("decoder", "all"),
                                       use_kernels=use_kernels)

    # ---- Soft Semantic Alignment on the boxes of the targets --------------------------------
    embed_dim = strong_features.shape[1]
    ssa = strong_features.float().sum() * 0.0  # connected zero when SSA is off
    weak_embeddings = strong_features.new_zeros((0, embed_dim), dtype=torch.float32)  # 0 x C
    ssa_valid = torch.zeros_like(valid)
    if settings.method == "resam":
        stride = batch.image_size // strong_features.shape[-1]
        ssa_valid = valid & pseudo.flatten(2).any(dim=2)  # B x K: a box needs a non-empty target
        target_boxes = masks_to_boxes(pseudo)  # B x K x 4
        weak_box_embeddings = box_embeddings(weak_features, target_boxes, stride=stride)  # B x K x C, no grad
        weak_embeddings = F.normalize(weak_box_embeddings[ssa_valid], dim=1).detach()  # M x C
        if settings.ssa_weight != 0.0:
            strong_box_embeddings = box_embeddings(strong_features, target_boxes, stride=stride)  # B x K x C
            ssa = ssa_loss(strong_box_embeddings, weak_box_embeddings, ssa_valid, queue.keys(),
                           tau=settings.ssa_tau, use_kernels=use_kernels)

    loss = settings.focal_weight * focal + dice + iou_mse + settings.ssa_weight * ssa
    parts = {"focal": focal.detach(), "dice": dice.detach(), "iou_mse": iou_mse.detach(),
             "ssa": ssa.detach(), "total": loss.detach()}

    # ---- monitoring: one device-to-host transfer ----------------------------------------------
    monitored["n_instances"] = real.sum()
    monitored["n_valid"] = valid.sum()
    monitored["n_ssa"] = ssa_valid.sum()
    names = list(monitored)
    values = torch.stack([monitored[name].double() for name in names]).tolist()
    stats = {name: value for name, value in zip(names, values) if not math.isnan(value)}
    stats["kept_fraction"] = stats["n_valid"] / stats["n_instances"] if stats["n_instances"] else 0.0
    return StepResult(loss=loss, parts=parts, weak_embeddings=weak_embeddings, stats=stats)
