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

from resam_kernels.launch import refuse_tuning_while_capturing

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


# Where the reference's clamp of p to [1e-6, 1 - 1e-6] starts: |logit| = ln((1 - 1e-6) / 1e-6).
LOGIT_CLAMP = math.log((1.0 - 1e-6) / 1e-6)  # = ln(999999) = 13.815509557963773


@triton.jit
def _entropy_filter_kernel(logits_ptr, keep_ptr, confidence_ptr, numel, eps, numel_bucket,
                           WRITE_CONFIDENCE: tl.constexpr, BLOCK: tl.constexpr):
    # logits: numel (fp32/bf16/fp16), keep: numel uint8, confidence: numel float32.
    # numel_bucket (log2 of numel, rounded up) is only an autotuning key.
    #
    # With a = min(|x|, LOGIT_CLAMP), t = exp(-a), the predicted side has probability q = 1/(1+t)
    # and the other one 1 - q = t q; ln q = -ln(1+t), ln(1-q) = -a - ln(1+t), so the entropy in
    # bits is H = log2(1+t) + t q a / ln 2, and p = q for x >= 0, t q otherwise: one exp2, one
    # log2 and one division per element. Clamping a reproduces the reference's clamp of p.
    # A BLOCK/4 x 4 tile, not a flat BLOCK vector: Triton then gives the load, both stores and
    # the arithmetic the same layout (4 consecutive elements per thread). With a flat vector it
    # vectorises each memory operation to 16 bytes (8 bf16, 4 float32 or 16 uint8 elements per
    # thread) and converts between those layouts through shared memory (sm_90 PTX: st.shared,
    # ldmatrix and a bar.sync per round); the tile form compiles without any of it.
    rows = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)  # BLOCK/4
    offsets = rows[:, None] * 4 + tl.arange(0, 4)[None, :]  # BLOCK/4 x 4
    in_range = offsets < numel
    logit = tl.load(logits_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    # a / ln 2 (bits); NaN logits stay NaN (as in the reference: NaN confidence, not kept)
    bits = tl.minimum(tl.abs(logit) * 1.4426950408889634, 19.931567126628412,  # LOGIT_CLAMP / ln 2
                      propagate_nan=tl.PropagateNan.ALL)
    t = tl.exp2(-bits)  # exp(-a), in [1e-6 / (1 - 1e-6), 1]
    q = 1.0 / (1.0 + t)  # probability of the predicted side, in [1/2, 1 - 1e-6]
    other = t * q  # 1 - q without cancellation
    entropy = tl.log2(1.0 + t) + other * bits  # normalised binary entropy, in [0, 1]
    p = tl.where(logit >= 0.0, q, other)
    confidence = p * (1.0 - entropy)
    tl.store(keep_ptr + offsets, (confidence > eps).to(tl.uint8), mask=in_range)
    if WRITE_CONFIDENCE:
        tl.store(confidence_ptr + offsets, confidence, mask=in_range)


# On the GPU the block size is tuned on first use per (numel bucket, dtype, WRITE_CONFIDENCE);
# every config writes the same outputs from the inputs only, so re-running one is harmless.
# Elements per thread = BLOCK / (32 num_warps), in runs of 4: float32 loads and confidence stores
# of 16 bytes, bf16 loads of 8, keep stores of 4 (sm_90 ptxas, triton 3.8: no spills, 40-164
# registers per thread, no shared memory). The loads of one thread are all in flight at once,
# so 2-byte logits need twice the elements per thread of float32 ones for the same bytes in
# flight: the 64-elements-per-thread configs are there for bf16/fp16.
_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps)
            for block, warps in ((2048, 8), (4096, 8), (8192, 8), (4096, 4), (8192, 4),
                                 (16384, 8), (16384, 16))]
_entropy_filter_kernel_tuned = triton.autotune(
    configs=_CONFIGS, key=["numel_bucket", "WRITE_CONFIDENCE"])(_entropy_filter_kernel)
# The size classes launched through the autotuner so far: (numel bucket, confidence written, logits
# dtype), the autotuner's key (its other tensors' dtypes follow from these).
_TUNED_SIZES: set[tuple] = set()
# The interpreter runs one numpy call per block operation: few big blocks are much faster there.
_INTERPRET_BLOCK = 1 << 16


def entropy_filter_triton(logits: torch.Tensor, eps: float, *, return_confidence: bool = False):
    """Fused Triton version of `entropy_filter_reference` (same outputs)."""
    logits = logits.contiguous()
    keep = torch.empty(logits.shape, dtype=torch.uint8, device=logits.device)
    confidence = (torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
                  if return_confidence else keep)  # a dummy pointer when not written
    numel = logits.numel()
    if numel > 0:
        numel_bucket = (numel - 1).bit_length()
        if INTERPRET:
            grid = (triton.cdiv(numel, _INTERPRET_BLOCK),)
            _entropy_filter_kernel[grid](logits, keep, confidence, numel, float(eps), numel_bucket,
                                         WRITE_CONFIDENCE=return_confidence,
                                         BLOCK=_INTERPRET_BLOCK)
        else:
            def grid(meta):
                return (triton.cdiv(numel, meta["BLOCK"]),)
            size_class = (numel_bucket, return_confidence, logits.dtype)
            if size_class not in _TUNED_SIZES:
                refuse_tuning_while_capturing("entropy_filter", size_class)
            _entropy_filter_kernel_tuned[grid](logits, keep, confidence, numel, float(eps),
                                               numel_bucket, WRITE_CONFIDENCE=return_confidence)
            _TUNED_SIZES.add(size_class)
    keep = keep.view(torch.bool)
    return (keep, confidence) if return_confidence else keep
