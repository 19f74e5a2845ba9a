"""Refine: entropy filter and overlap suppression of the teacher's point-prompted masks (SPEC 1).

Per pixel of every instance: p = sigmoid(logit), H = normalised binary entropy, confidence
c = p (1 - H); the pixel is kept when c > eps. Then a pixel kept by several instances of the same
image is removed from all of them (`drop`, the paper) or kept by the most confident one
(`argmax`). Both steps run in `resam_kernels` (Triton on CUDA, or the torch references).
Padding instances (k >= counts[b]) come out empty and are never marked `empty`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resam_dist.data.batch import valid_from_counts


@dataclass
class RefineResult:
    masks: torch.Tensor  # B x K x H x W bool, refined masks (padding instances all False)
    boxes: torch.Tensor  # B x K x 4 float32 tight boxes (x0, y0, x1, y1), x1/y1 exclusive; empty -> 0
    empty: torch.Tensor  # B x K bool, real instance (k < counts[b]) whose refined mask is empty


def refine(logits: torch.Tensor, counts: torch.Tensor, *, eps: float, mode: str,
           use_kernels: bool) -> RefineResult:
    """logits B x K x H x W (teacher, point prompts), counts B -> RefineResult."""
    import resam_kernels  # imported late: TRITON_INTERPRET must be set before the kernels load

    if logits.dim() != 4 or counts.shape != logits.shape[:1]:
        raise ValueError(f"refine: logits must be B x K x H x W and counts B, got {tuple(logits.shape)} "
                         f"and {tuple(counts.shape)}")
    if mode not in resam_kernels.MODES:
        raise ValueError(f"refine: resam.overlap_mode must be one of {resam_kernels.MODES}, got {mode!r}")
    logits = logits.detach()
    if mode == "argmax":
        keep, confidence = resam_kernels.entropy_filter(logits, eps, return_confidence=True,
                                                        use_triton=use_kernels)  # B x K x H x W each
    else:
        keep, confidence = resam_kernels.entropy_filter(logits, eps, use_triton=use_kernels), None
    masks, boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode, use_triton=use_kernels)
    real = valid_from_counts(counts.to(logits.device), logits.shape[1])  # B x K
    empty = real & ~masks.flatten(2).any(dim=2)  # B x K
    return RefineResult(masks=masks, boxes=boxes, empty=empty)
