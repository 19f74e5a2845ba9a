"""Reinforce's mask losses on the 4x bilinear upsampling of low-res mask logits.

Specification (`upsampled_mask_loss_terms_reference`): for float32 low-res logits ... x h x w and
a bool target ... x 4h x 4w,
    upsampled_mask_loss_terms(low_res, target) = mask_loss_terms(upsample4x(low_res), target)
i.e. (focal, dice, iou) per instance as `resam_kernels.mask_loss` defines them, of the logits that
`resam_kernels.upsample` defines (bilinear, align_corners=False), with the gradient with respect
to the low-res logits.

Why: the student's full-resolution logits (ViT-B step: 4 images x 50 instances x 1024 x 1024
float32 = 800 MiB) and their gradient (another 800 MiB) are both live when the loss's backward
starts, the training step's memory peak (H200 run 9, benchmarks/memory_peak.py). Computing the
loss from the low-res logits (200 x 256 x 256) never writes either.
"""

from __future__ import annotations

import torch

from resam_kernels.mask_loss import check_triton_sizes, mask_loss_terms_reference, mask_loss_terms_triton
from resam_kernels.upsample import upsample4x_reference, upsample4x_triton


def check_upsampled_inputs(low_res: torch.Tensor, target: torch.Tensor) -> None:
    if (low_res.dim() < 2 or low_res.dtype != torch.float32 or target.dtype != torch.bool
            or target.shape != (*low_res.shape[:-2], 4 * low_res.shape[-2], 4 * low_res.shape[-1])):
        raise ValueError(f"upsampled_mask_loss_terms needs float32 low-res logits ... x h x w and a bool "
                         f"target ... x 4h x 4w, got {low_res.dtype} {tuple(low_res.shape)} and "
                         f"{target.dtype} {tuple(target.shape)}")


def _upsampled(low_res: torch.Tensor, upsample) -> torch.Tensor:
    """... x h x w -> ... x 4h x 4w through `upsample` (N x 1 x h x w planes)."""
    height, width = low_res.shape[-2:]
    planes = low_res.reshape(-1, 1, height, width)  # N x 1 x h x w
    return upsample(planes).reshape(*low_res.shape[:-2], 4 * height, 4 * width)


def upsampled_mask_loss_terms_reference(low_res: torch.Tensor, target: torch.Tensor
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """low_res ... x h x w float32, target ... x 4h x 4w bool -> (focal, dice, iou), each ...
    float32; focal and dice differentiable wrt low_res, iou not."""
    check_upsampled_inputs(low_res, target)
    return mask_loss_terms_reference(_upsampled(low_res, upsample4x_reference), target)


def upsampled_mask_loss_terms_triton(low_res: torch.Tensor, target: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of `upsampled_mask_loss_terms_reference` (same outputs and gradient)."""
    check_upsampled_inputs(low_res, target)
    check_triton_sizes(target)
    return mask_loss_terms_triton(_upsampled(low_res, upsample4x_triton), target)
