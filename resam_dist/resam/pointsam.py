"""PointSAM-style training step: the baseline of the memory benchmark (SPEC.md, "PointSAM").

A re-implementation of the structure of PointSAM (Liu et al.), sharing this project's model,
batch and loss code, selected with `resam.method = "pointsam"`:

- **Teacher with gradients.** The teacher is the same network on the weak view, run WITHOUT
  `torch.no_grad`: its encoder activations stay alive until backward (its point features feed the
  prototype loss), and its decoder outputs are held in `PointSamState.teacher_outputs` until the
  next step starts, as a training loop that keeps the teacher's outputs in scope during
  `backward()` does. This is the memory behaviour the benchmark compares against.
- **Negative Prompt Calibration (NPC).** The teacher first segments every instance from its
  positive points alone. Two instances overlap when the IoU of these teacher masks exceeds
  `resam.pointsam_overlap_iou` (0.1). The negatives of an instance are then the positive points of
  the instances overlapping it (instead of random negatives from outside its mask); an instance
  that overlaps nothing is prompted with its positives only. The teacher is queried again with
  the calibrated prompts; its masks (logit > 0, detached) are the pseudo-labels, and the student
  (strong view, with gradient) gets the same calibrated prompts.
- **Prototype-based regularisation (PBR).** Point features = the weak-view (teacher) encoder
  feature map sampled bilinearly at every positive point. A FIFO store keeps the last
  `resam.pointsam_store_size` of them (detached). Every `resam.pointsam_cluster_every`
  iterations the store is clustered with FINCH (cosine) into prototypes, which are matched to the
  target prototypes with the Hungarian algorithm on cosine distance. The target prototypes are
  the FINCH clusters of the point features of the first `resam.pointsam_target_images` training
  images (collected by the step itself while those images stream by, then frozen).
  Loss: each point feature of the current batch joins its nearest prototype; for every matched
  prototype that got points, the mean of those points (with gradient) is pulled towards the
  matched target: `L_pbr = mean over matched pairs of (1 - cos)`. Zero (connected to the graph)
  until both prototypes and targets exist.

Loss: `focal_weight * focal + dice + iou_mse + pointsam_proto_weight * L_pbr`.

Choices of this re-implementation (the SPEC fixes the structure, not these details): images and
prompts are batched like the rest of this project (PointSAM trains one image per step); the store
is class-agnostic (batches carry no category ids) and per rank (not synchronised across ranks);
prototypes come from FINCH's finest partition; the target features are collected during the
first steps rather than in a separate pass before training.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from resam_dist.config import Config
from resam_dist.data.batch import Batch, valid_from_counts
from resam_dist.resam.losses import mask_losses

MIN_CLUSTER_POINTS = 3
"""Fewer stored point features than this are not clustered (FINCH needs a few points)."""


# ----------------------------------------------------------------------------------------------
# clustering and matching


def cluster_prototypes(features: torch.Tensor) -> torch.Tensor:
    """FINCH (cosine) on N x C point features; returns the L2-normalised means of the clusters of
    FINCH's first (finest) partition, P x C float32 (P >= 1). The coarser FINCH levels merge
    well-separated groups quickly (often down to 2 clusters), so the first level is used.
    Raises ValueError for N < MIN_CLUSTER_POINTS."""
    if features.dim() != 2 or features.shape[0] < MIN_CLUSTER_POINTS:
        raise ValueError(f"cluster_prototypes: need N x C features with N >= {MIN_CLUSTER_POINTS}, "
                         f"got {tuple(features.shape)}")
    with warnings.catch_warnings():  # finch warns at import when the optional pynndescent is absent
        warnings.simplefilter("ignore")
        from finch import FINCH

    data = F.normalize(features.detach().float().cpu(), dim=1).numpy()  # N x C
    partitions, _, _ = FINCH(data, distance="cosine", verbose=False)  # N x levels, finest first
    labels = torch.from_numpy(np.asarray(partitions)[:, 0].astype(np.int64))  # N, the finest level
    _, labels = torch.unique(labels, return_inverse=True)  # N, relabelled 0..P-1
    num_clusters = int(labels.max()) + 1
    sums = torch.zeros(num_clusters, data.shape[1]).index_add_(0, labels, torch.from_numpy(data))  # P x C
    return F.normalize(sums, dim=1)


def match_prototypes(prototypes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hungarian matching on cosine distance (1 - cos) between P x C prototypes and T x C targets.

    Returns P int64: the index of the target matched to each prototype, -1 for prototypes left
    unmatched (when P > T). Every target is used at most once; min(P, T) pairs are made.
    """
    matched = torch.full((prototypes.shape[0],), -1, dtype=torch.int64)
    if prototypes.shape[0] == 0 or targets.shape[0] == 0:
        return matched
    cost = 1.0 - F.normalize(prototypes.float(), dim=1) @ F.normalize(targets.float(), dim=1).T  # P x T
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    matched[torch.from_numpy(rows).long()] = torch.from_numpy(cols).long()
    return matched


def prototype_loss(point_features: torch.Tensor, prototypes: torch.Tensor, matched: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """PBR loss of the current batch.

    point_features M x C (with gradient); prototypes P x C; matched P (target index or -1);
    targets T x C. Each point joins its nearest prototype (cosine); for every matched prototype
    holding points, 1 - cos(mean of its points, matched target); mean over those pairs. A float32
    zero connected to the graph when there is no pair.
    """
    zero = point_features.float().sum() * 0.0
    if point_features.shape[0] == 0 or prototypes.shape[0] == 0 or targets.shape[0] == 0:
        return zero
    device = point_features.device
    feats = F.normalize(point_features.float(), dim=1)  # M x C
    protos = F.normalize(prototypes.to(device).float(), dim=1)  # P x C
    nearest = (feats.detach() @ protos.T).argmax(dim=1)  # M
    num_protos = protos.shape[0]
    sums = torch.zeros(num_protos, feats.shape[1], device=device).index_add(0, nearest, feats)  # P x C
    members = torch.bincount(nearest, minlength=num_protos)  # P
    matched = matched.to(device)
    used = (members > 0) & (matched >= 0)  # P
    if not bool(used.any()):
        return zero
    batch_protos = F.normalize(sums[used], dim=1)  # U x C
    matched_targets = F.normalize(targets.to(device).float()[matched[used]], dim=1)  # U x C
    return (1.0 - (batch_protos * matched_targets).sum(dim=1)).mean()


# ----------------------------------------------------------------------------------------------
# state


class PointSamState:
    """Training state of the PointSAM-style method, outside the model and the DeepSpeed engine.

    store: FIFO of point features (oldest first, at most `store_size`); prototypes: FINCH
    clusters of the store, with `matched` (target index per prototype, -1 unmatched);
    target_prototypes: frozen once `num_target_images` images were seen (their features collect
    in `target_buffer` until then); iteration: steps taken. All tensors float32 on the CPU.
    `teacher_outputs` holds the last teacher decoder outputs (with their graph) until the next
    step; it is not part of `state_dict()`.
    """

    def __init__(self, *, dim: int, store_size: int = 256, cluster_every: int = 30,
                 num_target_images: int = 128) -> None:
        if dim <= 0 or store_size < MIN_CLUSTER_POINTS or cluster_every < 1 or num_target_images < 1:
            raise ValueError(
                f"PointSamState: need dim > 0, store_size >= {MIN_CLUSTER_POINTS} (resam.pointsam_store_size), "
                f"cluster_every >= 1 (resam.pointsam_cluster_every), num_target_images >= 1 "
                f"(resam.pointsam_target_images); got dim={dim}, store_size={store_size}, "
                f"cluster_every={cluster_every}, num_target_images={num_target_images}")
        self.dim = dim
        self.store_size = store_size
        self.cluster_every = cluster_every
        self.num_target_images = num_target_images
        self.store = torch.zeros(0, dim)  # n x C, n <= store_size
        self.prototypes = torch.zeros(0, dim)  # P x C
        self.matched = torch.zeros(0, dtype=torch.int64)  # P
        self.target_prototypes = torch.zeros(0, dim)  # T x C
        self.target_buffer = torch.zeros(0, dim)  # features of the first images, until targets exist
        self.target_images_seen = 0
        self.iteration = 0
        self.teacher_outputs: tuple[torch.Tensor, ...] | None = None

    @classmethod
    def from_config(cls, cfg: Config, dim: int) -> "PointSamState":
        return cls(dim=dim, store_size=cfg.resam.pointsam_store_size,
                   cluster_every=cfg.resam.pointsam_cluster_every,
                   num_target_images=cfg.resam.pointsam_target_images)

    @property
    def targets_ready(self) -> bool:
        return self.target_prototypes.shape[0] > 0

    def push(self, features: torch.Tensor) -> None:
        """Append N x C point features (detached) and keep the newest `store_size`."""
        self._check(features, "push")
        merged = torch.cat([self.store, features.detach().float().cpu()], dim=0)
        self.store = merged[-self.store_size:].clone()

    def collect_targets(self, features: torch.Tensor, num_images: int) -> None:
        """Feed the point features of `num_images` images to the target set until it holds the
        first `num_target_images` images; then cluster it into the (frozen) target prototypes."""
        self._check(features, "collect_targets")
        if self.targets_ready:
            return
        self.target_buffer = torch.cat([self.target_buffer, features.detach().float().cpu()], dim=0)
        self.target_images_seen += num_images
        if self.target_images_seen >= self.num_target_images and self.target_buffer.shape[0] >= MIN_CLUSTER_POINTS:
            self.target_prototypes = cluster_prototypes(self.target_buffer)
            self.target_buffer = torch.zeros(0, self.dim)
            self.matched = match_prototypes(self.prototypes, self.target_prototypes)

    def commit(self, point_features: torch.Tensor, num_images: int) -> bool:
        """The state update of an accepted step (the trainer calls it after the optimizer step, never
        for a step the loss guard skipped): collect targets, push the store, count the iteration
        (with its periodic clustering). point_features: M x C from `StepResult.weak_embeddings`.
        Returns whether the store was clustered."""
        self.collect_targets(point_features, num_images)
        self.push(point_features)
        return self.step_done()

    def step_done(self) -> bool:
        """Count one iteration; every `cluster_every` iterations cluster the store and match the
        prototypes to the targets. Returns whether it clustered."""
        self.iteration += 1
        if self.iteration % self.cluster_every != 0 or self.store.shape[0] < MIN_CLUSTER_POINTS:
            return False
        self.prototypes = cluster_prototypes(self.store)
        self.matched = match_prototypes(self.prototypes, self.target_prototypes)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "store_size": self.store_size, "cluster_every": self.cluster_every,
                "num_target_images": self.num_target_images, "store": self.store.clone(),
                "prototypes": self.prototypes.clone(), "matched": self.matched.clone(),
                "target_prototypes": self.target_prototypes.clone(), "target_buffer": self.target_buffer.clone(),
                "target_images_seen": self.target_images_seen, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = {"dim", "store", "prototypes", "matched", "target_prototypes", "target_buffer",
                "target_images_seen", "iteration"}
        missing = keys - set(state)
        if missing:
            raise ValueError(f"PointSamState.load_state_dict: missing keys {sorted(missing)}")
        if state["dim"] != self.dim:
            raise ValueError(f"PointSamState.load_state_dict: checkpoint features have {state['dim']} channels, "
                             f"this model's have {self.dim}")
        self.store = state["store"].float().cpu()[-self.store_size:].clone()
        self.prototypes = state["prototypes"].float().cpu().clone()
        self.matched = state["matched"].long().cpu().clone()
        self.target_prototypes = state["target_prototypes"].float().cpu().clone()
        self.target_buffer = state["target_buffer"].float().cpu().clone()
        self.target_images_seen = int(state["target_images_seen"])
        self.iteration = int(state["iteration"])
        self.teacher_outputs = None

    def _check(self, features: torch.Tensor, name: str) -> None:
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ValueError(f"PointSamState.{name}: expected N x {self.dim} features, got {tuple(features.shape)}")


# ----------------------------------------------------------------------------------------------
# Negative Prompt Calibration


def pairwise_mask_iou(masks: torch.Tensor) -> torch.Tensor:
    """IoU between every pair of instance masks of each image: B x K x H x W bool -> B x K x K
    float32 (0 where the union is empty)."""
    flat = masks.flatten(2).float()  # B x K x HW
    intersection = flat @ flat.transpose(1, 2)  # B x K x K
    area = flat.sum(dim=2)  # B x K
    union = area.unsqueeze(2) + area.unsqueeze(1) - intersection  # B x K x K
    return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.zeros_like(union))


def calibrated_prompts(positives: torch.Tensor, teacher_masks: torch.Tensor, counts: torch.Tensor, *,
                       iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Negative Prompt Calibration.

    positives: B x K x N x 2 positive points; teacher_masks: B x K x H x W bool (from the
    positives); counts: B. Instances j != k of the same image overlap when IoU > iou_threshold.
    Returns (points B x K x (N + J*N) x 2, labels B x K x (N + J*N), overlap B x K x K bool):
    each instance's N positives (label 1), then the positives of the instances overlapping it
    in increasing index order (label 0), padded with label -1 (and zero coordinates);
    J = the most overlapping instances of any instance in the batch (0: positives only).
    """
    num_images, num_instances, num_points, _ = positives.shape
    valid = valid_from_counts(counts.to(positives.device), num_instances)  # B x K
    iou = pairwise_mask_iou(teacher_masks)  # B x K x K
    not_self = ~torch.eye(num_instances, dtype=torch.bool, device=positives.device)  # K x K
    overlap = (iou > iou_threshold) & valid.unsqueeze(2) & valid.unsqueeze(1) & not_self  # B x K x K
    pos_labels = torch.ones(num_images, num_instances, num_points, dtype=torch.int64, device=positives.device)
    max_neighbours = int(overlap.sum(dim=2).max()) if overlap.numel() else 0
    if max_neighbours == 0:
        return positives, pos_labels, overlap
    # the first J overlapping instances of each instance, True entries first, in index order
    order = torch.argsort(overlap.to(torch.int8), dim=2, descending=True, stable=True)  # B x K x K
    order = order[..., :max_neighbours]  # B x K x J
    present = torch.gather(overlap, 2, order)  # B x K x J
    image_index = torch.arange(num_images, device=positives.device).view(num_images, 1, 1)  # B x 1 x 1
    neighbour_points = positives[image_index, order]  # B x K x J x N x 2
    neighbour_points = neighbour_points * present[..., None, None]  # zero coordinates for padding
    negatives = neighbour_points.reshape(num_images, num_instances, max_neighbours * num_points, 2)
    neg_labels = torch.where(present, 0, -1).repeat_interleave(num_points, dim=2)  # B x K x J*N
    points = torch.cat([positives, negatives.to(positives.dtype)], dim=2)  # B x K x (N + J*N) x 2
    labels = torch.cat([pos_labels, neg_labels.to(torch.int64)], dim=2)  # B x K x (N + J*N)
    return points, labels, overlap


def sample_point_features(features: torch.Tensor, points: torch.Tensor, image_size: int) -> torch.Tensor:
    """Bilinear samples of the feature map at input-pixel points.

    features B x C x h x w (cell j covers pixels [16j, 16j + 16), centre 16j + 8); points
    B x M x 2 (x, y) on the S x S canvas. Returns B x M x C float32 (differentiable).
    """
    grid = (points.float() / image_size) * 2.0 - 1.0  # B x M x 2 in [-1, 1], align_corners=False convention
    sampled = F.grid_sample(features.float(), grid.unsqueeze(2), mode="bilinear",
                            padding_mode="border", align_corners=False)  # B x C x M x 1
    return sampled.squeeze(3).transpose(1, 2)  # B x M x C


# ----------------------------------------------------------------------------------------------
# the step


def pointsam_step(model: Any, batch: Batch, state: PointSamState, cfg: Config, *, min_chunks: int = 1):
    """One PointSAM-style step (see the module docstring); the caller runs backward and the optimizer.

    `model` is a `PromptableSam` (with LoRA) or a DeepSpeed engine wrapping one (`encode`,
    `decode` are called). The first `data.num_points` positives of each instance are its prompts
    (the batch's random negatives are replaced by NPC). `min_chunks` is passed to every `decode`
    (ZeRO-3, see `resam_step`). Returns a `StepResult`: parts focal, dice, iou_mse, proto, total;
    `weak_embeddings` holds the M x C weak-view point features (detached), which the caller hands
    to `state.commit(...)` once the step is accepted (target collection, store push, iteration
    count and periodic clustering), as the ReSAM queue is pushed only after an accepted step.
    """
    from resam_dist.resam.step import StepResult, select_points

    state.teacher_outputs = None  # release the previous step's teacher graph
    counts = batch.counts
    num_images, num_instances = batch.point_labels.shape[:2]
    num_points = cfg.data.num_points
    points, _ = select_points(batch.points, batch.point_labels, num_points)  # B x K x 2N x 2
    max_instances = cfg.data.max_instances
    valid = valid_from_counts(counts, num_instances)  # B x K
    positives = points[:, :, :num_points]  # B x K x N x 2
    image_size = batch.image_size
    pos_labels = torch.ones(num_images, num_instances, num_points, dtype=torch.int64,
                            device=positives.device)  # B x K x N

    # teacher on the weak view, with gradients (no torch.no_grad: PointSAM's memory behaviour)
    teacher_features = model.encode(batch.weak)  # B x C x h x w
    first_logits, _ = model.decode(teacher_features, counts, positives, pos_labels,
                                   max_instances=max_instances, min_chunks=min_chunks)  # B x K x S x S
    points, labels, overlap = calibrated_prompts(positives, first_logits.detach() > 0, counts,
                                                 iou_threshold=cfg.resam.pointsam_overlap_iou)
    teacher_logits, teacher_iou = model.decode(teacher_features, counts, points, labels,
                                               max_instances=max_instances, min_chunks=min_chunks)  # B x K x S x S
    pseudo_masks = teacher_logits.detach() > 0  # B x K x S x S

    # student on the strong view with the calibrated prompts
    student_features = model.encode(batch.strong)
    student_logits, student_iou = model.decode(student_features, counts, points, labels,
                                               max_instances=max_instances, min_chunks=min_chunks)

    focal, dice, iou_mse = mask_losses(student_logits, student_iou, pseudo_masks, valid,
                                       use_kernels=cfg.kernels.enabled)

    # prototype-based regularisation on the teacher's point features (gradient through the teacher)
    point_features = sample_point_features(
        teacher_features, positives.reshape(num_images, num_instances * num_points, 2), image_size)
    point_valid = valid.repeat_interleave(num_points, dim=1)  # B x K*N
    point_features = point_features[point_valid]  # M x C
    proto = prototype_loss(point_features, state.prototypes, state.matched, state.target_prototypes)

    loss = (cfg.resam.focal_weight * focal + dice + iou_mse
            + cfg.resam.pointsam_proto_weight * proto)

    state.teacher_outputs = (first_logits, teacher_logits, teacher_iou)

    parts = {"focal": focal.detach(), "dice": dice.detach(), "iou_mse": iou_mse.detach(),
             "proto": proto.detach(), "total": loss.detach()}
    instances, npc_pairs, npc_negatives = torch.stack([valid.sum(), overlap.sum(), (labels == 0).sum()]).tolist()
    stats = {"instances": float(instances), "npc_pairs": float(npc_pairs),
             "npc_negatives": float(npc_negatives), "store": float(state.store.shape[0]),
             "prototypes": float(state.prototypes.shape[0]),
             "target_prototypes": float(state.target_prototypes.shape[0])}
    # the weak-view point features go to `state.commit` once the step is accepted
    return StepResult(loss=loss, parts=parts, weak_embeddings=point_features.detach().float(), stats=stats)
