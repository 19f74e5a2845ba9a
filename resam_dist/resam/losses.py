"""Losses of the Reinforce stage: focal, dice, IoU-MSE, instance box embeddings and SSA.

Conventions shared by every mask loss here:
- inputs are padded per image: logits B x K x H x W, targets B x K x H x W bool, and a
  `valid` B x K bool mask that says which instances take part (padding instances k >= counts[b]
  and dropped instances are False). Every instance slot is computed and the invalid ones get
  weight zero, so predictions and targets stay paired and nothing waits on the host.
- reduction: each term is first averaged over the pixels of one instance, then over all valid
  instances of the batch (every valid instance weighs the same, whatever its image).
- a batch without any valid instance gives an exact zero that is still connected to the graph,
  so backward() and gradient all-reduce work unchanged.
- computation is in float32 whatever the input dtype (bf16 logits are upcast; autocast is
  switched off inside), so the losses do not depend on the engine's precision setting.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0


def _no_autocast(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _check_pair(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, name: str) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"{name}: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if valid.shape != logits.shape[:2]:
        raise ValueError(f"{name}: valid {tuple(valid.shape)} must be B x K = {tuple(logits.shape[:2])}")


def _valid_mean(per_instance: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of B x K values over the valid instances; an exact 0 (connected to the graph, zero
    gradient) when there is none. No boolean indexing, so no device-to-host synchronisation."""
    selected = torch.where(valid, per_instance, torch.zeros_like(per_instance))  # B x K
    return selected.sum() / valid.sum().clamp(min=1)


def focal_per_instance(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = FOCAL_ALPHA,
                       gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Pixel mean of the sigmoid focal loss: logits ... x H x W, target ... x H x W bool -> ... float32.

    With s = x (2t - 1): p_t = sigmoid(s), 1 - p_t = sigmoid(-s) and BCE = softplus(-s), so the
    loss alpha_t (1 - p_t)^gamma BCE needs no separate probability tensors."""
    with _no_autocast(logits):
        signed = torch.where(target, logits.float(), -logits.float())  # s, ... x H x W
        alpha_t = torch.where(target, alpha, 1.0 - alpha)
        per_pixel = alpha_t * torch.sigmoid(-signed).pow(gamma) * F.softplus(-signed)
        return per_pixel.flatten(-2).mean(dim=-1)


def dice_per_instance(logits: torch.Tensor, target: torch.Tensor, *, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft dice loss 1 - (2 |P.T| + s) / (|P| + |T| + s) on sigmoid probabilities:
    logits ... x H x W, target ... x H x W bool -> ... float32."""
    with _no_autocast(logits):
        p = torch.sigmoid(logits.float()).flatten(-2)  # ... x HW
        t = target.flatten(-2)  # ... x HW bool
        intersection = torch.where(t, p, 0.0).sum(dim=-1)
        total = p.sum(dim=-1) + t.sum(dim=-1)
        return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *,
               alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.): alpha_t (1 - p_t)^gamma BCE, pixel mean per instance, then
    mean over valid instances. logits/target B x K x H x W, valid B x K. Returns a float32 scalar."""
    _check_pair(logits, target, valid, "focal_loss")
    return _valid_mean(focal_per_instance(logits, target.bool(), alpha=alpha, gamma=gamma), valid)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *,
              smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """Soft dice on sigmoid probabilities, 1 - (2 |P.T| + s) / (|P| + |T| + s) per instance
    (s = 1), mean over valid instances. Returns a float32 scalar."""
    _check_pair(logits, target, valid, "dice_loss")
    return _valid_mean(dice_per_instance(logits, target.bool(), smooth=smooth), valid)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dims: ... x H x W -> ... float32.
    Two empty masks agree perfectly (IoU 1)."""
    intersection = (pred & target).flatten(-2).sum(dim=-1).float()
    union = (pred | target).flatten(-2).sum(dim=-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.ones_like(union))


def iou_mse_loss(pred_iou: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """MSE between SAM's predicted IoU (B x K) and the actual IoU of (logits > 0) with the target
    mask (a constant: no gradient through it), mean over valid instances."""
    _check_pair(logits, target, valid, "iou_mse_loss")
    if pred_iou.shape != valid.shape:
        raise ValueError(f"iou_mse_loss: pred_iou {tuple(pred_iou.shape)} must be B x K = {tuple(valid.shape)}")
    with _no_autocast(pred_iou):
        with torch.no_grad():
            actual = mask_iou(logits.detach() > 0, target.bool())  # B x K
        return _valid_mean((pred_iou.float() - actual).square(), valid)


def mask_losses(logits: torch.Tensor, pred_iou: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *,
                recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(focal, dice, iou_mse) of `focal_loss`, `dice_loss` and `iou_mse_loss` in one call.

    recompute: keep only logits and target for the backward and recompute the per-pixel
    intermediates there (activation checkpointing; the same values), instead of storing several
    B x K x H x W float32 tensors."""
    _check_pair(logits, target, valid, "mask_losses")
    target = target.bool()

    def per_instance(mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return focal_per_instance(mask_logits, target), dice_per_instance(mask_logits, target)  # B x K each

    if recompute and torch.is_grad_enabled():
        focal, dice = checkpoint(per_instance, logits, use_reentrant=False)
    else:
        focal, dice = per_instance(logits)
    return _valid_mean(focal, valid), _valid_mean(dice, valid), iou_mse_loss(pred_iou, logits, target, valid)


def box_embeddings(features: torch.Tensor, boxes: torch.Tensor, *, stride: int = 16) -> torch.Tensor:
    """Mean feature vector inside each box.

    features: B x C x h x w (feature cell (i, j) covers input pixels [stride*j, stride*(j+1)) x
    [stride*i, stride*(i+1))); boxes: B x K x 4 (x0, y0, x1, y1) in input pixels, x1/y1 exclusive.
    A cell is inside a box when its centre is. Per axis, a box that holds no cell centre (narrower
    than a cell, or between two centres) takes the cell containing the box centre on that axis, so
    a box smaller than a cell takes the one cell containing its centre. Returns B x K x C float32.
    """
    if features.dim() != 4 or boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != features.shape[0]:
        raise ValueError(f"box_embeddings: features must be B x C x h x w and boxes B x K x 4, got "
                         f"{tuple(features.shape)} and {tuple(boxes.shape)}")
    height, width = features.shape[-2:]
    with _no_autocast(features):
        feats = features.float()
        boxes = boxes.float()
        x0, y0, x1, y1 = boxes.unbind(dim=-1)  # each B x K
        col_centres = (torch.arange(width, device=feats.device, dtype=torch.float32) + 0.5) * stride  # w
        row_centres = (torch.arange(height, device=feats.device, dtype=torch.float32) + 0.5) * stride  # h
        cols = (col_centres >= x0.unsqueeze(-1)) & (col_centres < x1.unsqueeze(-1))  # B x K x w
        rows = (row_centres >= y0.unsqueeze(-1)) & (row_centres < y1.unsqueeze(-1))  # B x K x h
        centre_col = torch.div((x0 + x1) * 0.5, stride, rounding_mode="floor").long().clamp(0, width - 1)  # B x K
        centre_row = torch.div((y0 + y1) * 0.5, stride, rounding_mode="floor").long().clamp(0, height - 1)
        cols = torch.where(cols.any(dim=-1, keepdim=True), cols, F.one_hot(centre_col, width).bool())
        rows = torch.where(rows.any(dim=-1, keepdim=True), rows, F.one_hot(centre_row, height).bool())
        col_weights = cols.float() / cols.sum(dim=-1, keepdim=True)  # B x K x w, rows sum to 1
        row_weights = rows.float() / rows.sum(dim=-1, keepdim=True)  # B x K x h
        # mean over the box cells = separable weighted sum over rows and columns
        return torch.einsum("bkh,bchw,bkw->bkc", row_weights, feats, col_weights)  # B x K x C


def ssa_loss(student: torch.Tensor, weak: torch.Tensor, valid: torch.Tensor, queue_keys: torch.Tensor, *,
             tau: float, use_kernels: bool) -> torch.Tensor:
    """Soft Semantic Alignment on the valid instances.

    student: B x K x C strong-view embeddings (with gradient); weak: B x K x C weak-view embeddings
    (teacher, no gradient); valid: B x K; queue_keys: q x C (q may be 0). Both embeddings are
    normalised inside `resam_kernels.ssa_loss`, which sends gradient to `student` only.
    """
    import resam_kernels  # imported late: TRITON_INTERPRET must be set before the kernels load

    if student.shape != weak.shape or student.shape[:2] != valid.shape:
        raise ValueError(f"ssa_loss: student {tuple(student.shape)}, weak {tuple(weak.shape)} and valid "
                         f"{tuple(valid.shape)} must be B x K x C, B x K x C and B x K")
    with _no_autocast(student):
        # no valid instance: M = 0 rows, and the SSA loss is an exact zero attached to `student`
        keys = queue_keys.detach().float().to(student.device)  # q x C
        return resam_kernels.ssa_loss(student[valid].float(), weak[valid].detach().float(), keys, tau,
                                      use_triton=use_kernels).float()
