"""Triton kernels for ReSAM-dist (imported as `resam_kernels`).

Each dispatcher runs the Triton kernel when `use_triton` is true and the input is a CUDA tensor
(on that tensor's device, whichever device is current), or a CPU tensor while Triton's interpreter
is on (`TRITON_INTERPRET=1` in the environment when the kernel modules were first imported);
otherwise, or with `use_triton=False`, the torch reference (the specification, `*_reference` in
each module) runs. The reference also runs for inputs the reference takes and a kernel does not
(`resam_kernels.launch.UnsupportedByTriton`: a dtype such as float64, sizes beyond a kernel's
tiles or int32 offsets), and for the entropy filter's confidence where a gradient is wanted.

- `entropy_filter(logits, eps, *, return_confidence=False, use_triton=True)`
- `confidence(logits, *, use_triton=True)`
- `suppress_overlap(masks, confidence, counts, mode, *, use_triton=True)`
- `ssa_loss(student, weak, queue, tau, *, use_triton=True)`
- `mask_loss_terms(logits, target, *, use_triton=True)`
- `upsampled_mask_loss_terms(low_res, target, *, use_triton=True)`
- `instance_counts(pred, gt, *, use_triton=True)`
- `upsample4x(low_res, *, use_triton=True)`
- `relpos_attention(q, k, v, rel_h, rel_w, grid_w, scale, *, use_triton=True)`
- `layer_norm(x, weight, bias, eps, *, residual=None, pre_bias=None, gelu=False, use_triton=True)`
- `mask_head(upscaled, weight, bias, hyper_in, *, use_triton=True)`

On the GPU the entropy filter, overlap suppression and the SSA loss tune their launch on the first
call of each size class, which synchronises the device. To capture them in a CUDA graph, call them
once with the same sizes before capturing (as `torch.cuda.graphs` advises for warm-up anyway): an
untuned size class met during a capture raises a RuntimeError naming the function and the size
class, before anything is launched (`resam_kernels.launch.refuse_tuning_while_capturing`).
"""

from __future__ import annotations

import contextlib

import torch

from resam_kernels.counts import instance_counts_reference, instance_counts_triton
from resam_kernels.entropy import (INTERPRET, confidence_reference, entropy_filter_reference,
                                   entropy_filter_triton)
from resam_kernels.launch import UnsupportedByTriton
from resam_kernels.layer_norm import layer_norm_reference, layer_norm_triton
from resam_kernels.mask_head import mask_head_reference, mask_head_triton
from resam_kernels.mask_loss import mask_loss_terms_reference, mask_loss_terms_triton
from resam_kernels.mask_loss_upsampled import upsampled_mask_loss_terms_reference, upsampled_mask_loss_terms_triton
from resam_kernels.overlap import (MODES, suppress_overlap_reference, suppress_overlap_triton,
                                   tight_boxes_reference)
from resam_kernels.relpos_attention import relpos_attention_reference, relpos_attention_triton
from resam_kernels.ssa import ssa_loss_reference, ssa_loss_triton
from resam_kernels.upsample import upsample4x_reference, upsample4x_triton

__all__ = [
    "MODES", "confidence", "confidence_reference", "entropy_filter", "entropy_filter_reference",
    "instance_counts", "instance_counts_reference", "layer_norm", "layer_norm_reference", "mask_head",
    "mask_head_reference", "mask_loss_terms", "mask_loss_terms_reference", "relpos_attention",
    "relpos_attention_reference", "runs_triton", "ssa_loss", "ssa_loss_reference", "suppress_overlap",
    "suppress_overlap_reference", "tight_boxes_reference", "upsample4x", "upsample4x_reference",
    "upsampled_mask_loss_terms", "upsampled_mask_loss_terms_reference",
]


def runs_triton(tensor: torch.Tensor, use_triton: bool = True) -> bool:
    """Whether a dispatcher given `tensor` runs the Triton kernel (else the torch reference)."""
    if not use_triton:
        return False
    return tensor.is_cuda or (INTERPRET and tensor.device.type == "cpu")


def _wants_grad(tensor: torch.Tensor) -> bool:
    return tensor.requires_grad and torch.is_grad_enabled()


def _on_device_of(function: str, **tensors: torch.Tensor | None):
    """The context for a Triton call on the device of the first tensor given: on a CUDA device other
    than the current one, that device is made current for the call (Triton launches on the current
    device). Every other tensor given (None: not passed) must lie on that same device, else a
    ValueError names both: a kernel given another device's pointer reads garbage or faults."""
    (first_name, first), *others = tensors.items()
    for name, tensor in others:
        if tensor is not None and tensor.device != first.device:
            raise ValueError(f"resam_kernels.{function}: '{name}' is on {tensor.device} but '{first_name}' is on "
                             f"{first.device}; the kernel needs all of its inputs on one device")
    if first.is_cuda and first.get_device() != torch.cuda.current_device():
        return torch.cuda.device(first.device)
    return contextlib.nullcontext()


def entropy_filter(logits: torch.Tensor, eps: float, *, return_confidence: bool = False,
                   use_triton: bool = True):
    """Refine's entropy filter. logits: B x K x H x W (fp32/bf16/fp16).

    Returns keep (B x K x H x W bool, confidence > eps), or (keep, confidence float32 of the same
    shape) with `return_confidence` (what `suppress_overlap(..., mode="argmax")` needs).
    """
    # the kernel's confidence carries no gradient: the reference runs where one is wanted
    if runs_triton(logits, use_triton) and not (return_confidence and _wants_grad(logits)):
        with _on_device_of("entropy_filter", logits=logits):
            return entropy_filter_triton(logits, eps, return_confidence=return_confidence)
    return entropy_filter_reference(logits, eps, return_confidence=return_confidence)


def confidence(logits: torch.Tensor, *, use_triton: bool = True) -> torch.Tensor:
    """Per-pixel confidence c = p (1 - H): logits ... -> float32 of the same shape (differentiable
    through the reference where the logits need a gradient)."""
    if runs_triton(logits, use_triton) and not _wants_grad(logits):
        with _on_device_of("confidence", logits=logits):
            return entropy_filter_triton(logits, 0.0, return_confidence=True)[1]
    return confidence_reference(logits)


def suppress_overlap(masks: torch.Tensor, confidence: torch.Tensor | None, counts: torch.Tensor,
                     mode: str, *, use_triton: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap suppression and tight boxes, in one pass without host synchronisation.

    masks B x K x H x W bool, confidence B x K x H x W float (read in mode "argmax" only; may be
    None in mode "drop"), counts B int (instances k >= counts[b] are padding: ignored, output
    empty), mode "drop" (pixel kept by several instances removed from all) or "argmax" (kept by
    the most confident one, ties -> lowest k).
    Returns (masks B x K x H x W bool, boxes B x K x 4 float32 (x0, y0, x1, y1), x1/y1 exclusive,
    empty masks -> zeros).
    """
    if runs_triton(masks, use_triton):
        with _on_device_of("suppress_overlap", masks=masks, confidence=confidence if mode == "argmax" else None):
            return suppress_overlap_triton(masks, confidence, counts, mode)
    return suppress_overlap_reference(masks, confidence, counts, mode)


def ssa_loss(student: torch.Tensor, weak: torch.Tensor, queue: torch.Tensor, tau: float, *,
             use_triton: bool = True) -> torch.Tensor:
    """Soft Semantic Alignment loss (float32 scalar). student N x C (grad), weak N x C, queue q x C;
    all rows L2-normalised inside; gradient to `student` only. See `resam_kernels.ssa`."""
    if runs_triton(student, use_triton):
        with _on_device_of("ssa_loss", student=student, weak=weak, queue=queue):
            return ssa_loss_triton(student, weak, queue, tau)
    return ssa_loss_reference(student, weak, queue, tau)


def mask_loss_terms(logits: torch.Tensor, target: torch.Tensor, *, use_triton: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-instance (focal, dice, iou) of mask logits ... x H x W (fp32/bf16/fp16) against a bool
    target of the same shape: each ... float32; focal and dice differentiable wrt the logits, iou
    (of logits > 0) not. See `resam_kernels.mask_loss`."""
    if runs_triton(logits, use_triton):
        with _on_device_of("mask_loss_terms", logits=logits, target=target):
            try:
                return mask_loss_terms_triton(logits, target)
            except UnsupportedByTriton:  # (raised before any launch) the reference takes them
                pass
    return mask_loss_terms_reference(logits, target)


def upsampled_mask_loss_terms(low_res: torch.Tensor, target: torch.Tensor, *, use_triton: bool = True
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mask_loss_terms(upsample4x(low_res), target)` from float32 low-res logits ... x h x w and a
    bool target ... x 4h x 4w, without the full-resolution logits or their gradient. See
    `resam_kernels.mask_loss_upsampled`."""
    if runs_triton(low_res, use_triton):
        with _on_device_of("upsampled_mask_loss_terms", low_res=low_res, target=target):
            try:
                return upsampled_mask_loss_terms_triton(low_res, target)
            except UnsupportedByTriton:  # (raised before any launch) the reference takes them
                pass
    return upsampled_mask_loss_terms_reference(low_res, target)


def instance_counts(pred: torch.Tensor, gt: torch.Tensor, *, use_triton: bool = True) -> torch.Tensor:
    """Per-instance (tp, fp, fn) pixel counts: pred ... x H x W (bool, or float logits with
    foreground logit > 0), gt ... x H x W bool -> ... x 3 int64. See `resam_kernels.counts`."""
    if runs_triton(pred, use_triton):
        with _on_device_of("instance_counts", pred=pred, gt=gt):
            try:
                return instance_counts_triton(pred, gt)
            except UnsupportedByTriton:  # (raised before any launch) the reference takes them
                pass
    return instance_counts_reference(pred, gt)


def relpos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                     grid_w: int, scale: float, *, use_triton: bool = True) -> torch.Tensor:
    """softmax(scale q k^T + rel_h[i, row(j)] + rel_w[i, col(j)]) v: SAM's image-encoder attention
    with decomposed relative positions. q, k, v B x heads x N x d (N = H W tokens, row-major,
    W = grid_w), rel_h B x heads x N x H, rel_w B x heads x N x W -> B x heads x N x d in q's dtype;
    differentiable in all five. See `resam_kernels.relpos_attention`."""
    if runs_triton(q, use_triton):
        with _on_device_of("relpos_attention", q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w):
            try:
                return relpos_attention_triton(q, k, v, rel_h, rel_w, grid_w, scale)
            except UnsupportedByTriton:  # (raised before any launch) the reference takes them
                pass
    return relpos_attention_reference(q, k, v, rel_h, rel_w, grid_w, scale)


def upsample4x(low_res: torch.Tensor, *, use_triton: bool = True) -> torch.Tensor:
    """Bilinear 4x upsampling (align_corners=False) of float32 N x C x h x w -> N x C x 4h x 4w,
    differentiable. See `resam_kernels.upsample`."""
    if runs_triton(low_res, use_triton):
        with _on_device_of("upsample4x", low_res=low_res):
            try:
                return upsample4x_triton(low_res)
            except UnsupportedByTriton:  # (raised before any launch) the reference takes them
                pass
    return upsample4x_reference(low_res)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
               residual: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None, gelu: bool = False,
               use_triton: bool = True) -> torch.Tensor:
    """act(LayerNorm(x + residual + pre_bias) weight + bias) over the last dim C of x ... x C, float32
    math, in x's dtype (act = exact GELU with `gelu`); residual like x, pre_bias / weight / bias C.
    Differentiable in x, residual, pre_bias, weight and bias. See `resam_kernels.layer_norm`."""
    if runs_triton(x, use_triton):
        with _on_device_of("layer_norm", x=x, weight=weight, bias=bias, residual=residual,
                          pre_bias=pre_bias):
            try:
                return layer_norm_triton(x, weight, bias, eps, residual=residual, pre_bias=pre_bias, gelu=gelu)
            except UnsupportedByTriton:  # (raised before any launch) the reference takes them
                pass
    return layer_norm_reference(x, weight, bias, eps, residual=residual, pre_bias=pre_bias, gelu=gelu)


def mask_head(upscaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper_in: torch.Tensor, *,
              use_triton: bool = True) -> torch.Tensor:
    """SAM's last mask-decoder stage: gelu(conv_transpose2d(upscaled, weight, bias, stride=2)) dotted
    with each prompt's hyper_in over channels. upscaled N x Cin x H x W, weight Cin x Cout x 2 x 2,
    bias Cout, hyper_in N x Cout -> masks N x 1 x 2H x 2W float32, differentiable wrt all four.
    See `resam_kernels.mask_head`."""
    if runs_triton(upscaled, use_triton):
        with _on_device_of("mask_head", upscaled=upscaled, weight=weight, bias=bias, hyper_in=hyper_in):
            try:
                return mask_head_triton(upscaled, weight, bias, hyper_in)
            except UnsupportedByTriton:  # (raised before any launch) the reference takes them
                pass
    return mask_head_reference(upscaled, weight, bias, hyper_in)
