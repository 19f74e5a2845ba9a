"""Refine, step 1: entropy-based confidence filter of the teacher's mask logits.

Specification (SPEC.md, Refine), per pixel of every instance mask:
    p = sigmoid(logit) clamped to [1e-6, 1 - 1e-6]
    H = -(p ln p + (1 - p) ln(1 - p)) / ln 2        (normalised binary entropy, in [0, 1])
    c = p (1 - H)                                   (confidence)
    keep = c > eps

`entropy_filter_reference` is the specification in torch; `entropy_filter_triton` computes the
same in one fused pass (one read of the logits, one byte written per pixel, plus the float32
confidence when asked for: overlap suppression in `argmax` mode needs it).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Read once at import: Triton's interpreter must be switched on before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

P_MIN = 1e-6
P_MAX = 1.0 - 1e-6
INV_LN2 = 1.0 / math.log(2.0)


def confidence_reference(logits: torch.Tensor) -> torch.Tensor:
    """Confidence c = p (1 - H) of every pixel. logits: ... (fp32/bf16/fp16) -> same shape float32."""
    p = torch.sigmoid(logits.float()).clamp(P_MIN, P_MAX)
    entropy = -(p * torch.log(p) + (1.0 - p) * torch.log(1.0 - p)) * INV_LN2
    return p * (1.0 - entropy)


def entropy_filter_reference(logits: torch.Tensor, eps: float, *,
                             return_confidence: bool = False):
    """keep = confidence > eps. logits: B x K x H x W -> keep B x K x H x W bool
    (and the float32 confidence of the same shape when `return_confidence`)."""
    confidence = confidence_reference(logits)  # B x K x H x W float32
    keep = confidence > eps
    return (keep, confidence) if return_confidence else keep


@triton.jit
def _entropy_filter_kernel(logits_ptr, keep_ptr, confidence_ptr, numel, eps,
                           WRITE_CONFIDENCE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    logit = tl.load(logits_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    p = tl.sigmoid(logit)
    p = tl.minimum(tl.maximum(p, 1e-6), 1.0 - 1e-6)
    entropy = -(p * tl.log(p) + (1.0 - p) * tl.log(1.0 - p)) * 1.4426950408889634  # / ln 2
    confidence = p * (1.0 - entropy)
    tl.store(keep_ptr + offsets, (confidence > eps).to(tl.uint8), mask=in_range)
    if WRITE_CONFIDENCE:
        tl.store(confidence_ptr + offsets, confidence, mask=in_range)


# The interpreter runs one numpy call per block operation: few big blocks are much faster there.
_BLOCK = 1 << 16 if INTERPRET else 2048


def entropy_filter_triton(logits: torch.Tensor, eps: float, *, return_confidence: bool = False):
    """Fused Triton version of `entropy_filter_reference` (same outputs)."""
    logits = logits.contiguous()
    keep = torch.empty(logits.shape, dtype=torch.uint8, device=logits.device)
    confidence = (torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
                  if return_confidence else keep)  # a dummy pointer when not written
    numel = logits.numel()
    if numel > 0:
        grid = (triton.cdiv(numel, _BLOCK),)
        _entropy_filter_kernel[grid](logits, keep, confidence, numel, float(eps),
                                     WRITE_CONFIDENCE=return_confidence, BLOCK=_BLOCK,
                                     num_warps=8 if _BLOCK >= 2048 else 4)
    keep = keep.view(torch.bool)
    return (keep, confidence) if return_confidence else keep
