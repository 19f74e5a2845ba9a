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
The per-instance definitions (focal, dice, IoU of the thresholded mask) are the specification in
`resam_kernels.mask_loss`, shared by the torch path and the fused Triton kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


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


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal loss (Lin et al.): alpha_t (1 - p_t)^gamma BCE (alpha 0.25, gamma 2), pixel
    mean per instance, then mean over valid instances. logits/target B x K x H x W, valid B x K.
    Returns a float32 scalar."""
    from resam_kernels.mask_loss import focal_per_instance  # late: TRITON_INTERPRET is read at import

    _check_pair(logits, target, valid, "focal_loss")
    return _valid_mean(focal_per_instance(logits, target.bool()), valid)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Soft dice on sigmoid probabilities, 1 - (2 |P.T| + s) / (|P| + |T| + s) per instance
    (s = 1), mean over valid instances. Returns a float32 scalar."""
    from resam_kernels.mask_loss import dice_per_instance  # late: TRITON_INTERPRET is read at import

    _check_pair(logits, target, valid, "dice_loss")
    return _valid_mean(dice_per_instance(logits, target.bool()), valid)


def iou_mse_loss(pred_iou: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """MSE between SAM's predicted IoU (B x K) and the actual IoU of (logits > 0) with the target
    mask (a constant: no gradient through it), mean over valid instances."""
    _check_pair(logits, target, valid, "iou_mse_loss")
    if pred_iou.shape != valid.shape:
        raise ValueError(f"iou_mse_loss: pred_iou {tuple(pred_iou.shape)} must be B x K = {tuple(valid.shape)}")
    from resam_kernels.mask_loss import mask_iou  # late: TRITON_INTERPRET is read at import

    with torch.no_grad():
        actual = mask_iou(logits.detach() > 0, target.bool())  # B x K
    return _iou_mse(pred_iou, actual, valid)


def _iou_mse(pred_iou: torch.Tensor, actual: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    with _no_autocast(pred_iou):
        return _valid_mean((pred_iou.float() - actual).square(), valid)


def mask_losses(logits: torch.Tensor, pred_iou: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, *,
                low_res: bool = False, recompute: bool = False, use_kernels: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(focal, dice, iou_mse) of `focal_loss`, `dice_loss` and `iou_mse_loss` in one call, through
    `resam_kernels.mask_loss_terms` (the fused Triton kernel when `use_kernels` and it runs on
    this device; else the torch reference).

    low_res: `logits` are the decoder's float32 B x K x H/4 x W/4 low-resolution logits and the
    terms are those of their 4x bilinear upsampling (the logits `decode` returns by default),
    through `resam_kernels.upsampled_mask_loss_terms`: its Triton path never writes the
    B x K x H x W float32 logits or their gradient (the training step's memory peak otherwise).

    recompute: with the torch reference, keep only logits and target for the backward and
    recompute the per-pixel intermediates there (activation checkpointing; the same values),
    instead of storing several B x K x H x W float32 tensors. The Triton path saves only the
    logits, the target and three floats per instance anyway, so there it changes nothing."""
    import resam_kernels  # imported late: TRITON_INTERPRET must be set before the kernels load

    if low_res:
        if target.shape != (*logits.shape[:-2], 4 * logits.shape[-2], 4 * logits.shape[-1]):
            raise ValueError(f"mask_losses: low-res logits {tuple(logits.shape)} need a target of 4x their "
                             f"height and width, got {tuple(target.shape)}")
        if valid.shape != logits.shape[:2]:
            raise ValueError(f"mask_losses: valid {tuple(valid.shape)} must be B x K = {tuple(logits.shape[:2])}")
    else:
        _check_pair(logits, target, valid, "mask_losses")
    if pred_iou.shape != valid.shape:
        raise ValueError(f"mask_losses: pred_iou {tuple(pred_iou.shape)} must be B x K = {tuple(valid.shape)}")
    target = target.bool()
    loss_terms = resam_kernels.upsampled_mask_loss_terms if low_res else resam_kernels.mask_loss_terms

    def terms(mask_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return loss_terms(mask_logits, target, use_triton=use_kernels)  # B x K each

    if recompute and torch.is_grad_enabled() and not resam_kernels.runs_triton(logits, use_kernels):
        focal, dice, actual_iou = checkpoint(terms, logits, use_reentrant=False)
    else:
        focal, dice, actual_iou = terms(logits)
    return _valid_mean(focal, valid), _valid_mean(dice, valid), _iou_mse(pred_iou, actual_iou, valid)


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
