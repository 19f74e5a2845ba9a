"""Per-instance pixel counts of a predicted mask against a ground-truth mask (the confusion counts
behind the micro-imagewise IoU of SPEC "Evaluation").

Specification, per instance (pred and gt over H x W pixels; pred is a bool mask, or float logits
where foreground is logit > 0, NaN counting as background):
    tp = |pred & gt|,  fp = |pred & ~gt|,  fn = |~pred & gt|
`instance_counts_reference` is that specification in torch: ... x H x W -> ... x 3 int64.

Why a kernel: the training step monitors the IoU of the teacher's masks at every stage (four
times a step over B x K x S x S masks: 200 x 1024 x 1024 at ViT-B scale). In torch, summing bool
masks copies them to a wider dtype first, and logits are first thresholded into a new bool
tensor; `instance_counts_triton` reads pred (bool or logits, thresholded in registers) and gt once
and writes nothing but the counts.

Layout of the kernel: grid = N instances x C chunks of CHUNK = BLOCK * ITERS pixels (pixels of an
instance flattened to 1-D). A program streams its chunk in BLOCK-pixel steps with int32 lane
counters and adds its chunk's (tp, |pred| - tp, |gt| - tp) to its instance's row of the
zero-initialised N x 3 int64 output with integer atomic adds. Integer addition is exact and
order-free, so the result is deterministic whatever order the programs run in; fp and fn come
out directly (the sums over chunks of |pred| - tp and |gt| - tp). Why atomics rather than
partials and a second kernel: the output's zero fill and the count kernel are the only two
launches (partials would need their own allocation and a Triton finalize launch, whose host
cost is higher than a fill's; the int64 atomics are 3 per program, on N x 3 addresses). No host
synchronisation.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from resam_kernels.launch import UnsupportedByTriton, steps_per_program

# Read once at import: Triton's interpreter must be switched on before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_MASK_PIXELS = 1 << 30  # H W below this: pixel offsets inside a mask stay int32 in the kernel


def _foreground(pred: torch.Tensor) -> torch.Tensor:
    return pred if pred.dtype == torch.bool else pred > 0  # NaN > 0 is False


def check_count_inputs(pred: torch.Tensor, gt: torch.Tensor) -> None:
    """Shapes and dtypes only (no tensor op: the Triton path runs this on every call)."""
    if pred.dim() < 2 or pred.shape != gt.shape or gt.dtype != torch.bool:
        raise ValueError(f"instance_counts needs pred ... x H x W (bool or float logits) and a bool gt of the "
                         f"same shape, got {tuple(pred.shape)} {pred.dtype} and {tuple(gt.shape)} {gt.dtype}")
    if not (pred.dtype == torch.bool or pred.is_floating_point()):
        raise ValueError(f"instance_counts: pred must be bool masks or float logits, got dtype {pred.dtype}")


def instance_counts_reference(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """pred ... x H x W (bool, or float logits: logit > 0 is foreground), gt ... x H x W bool
    -> ... x 3 int64 (tp, fp, fn)."""
    check_count_inputs(pred, gt)
    pred_masks = _foreground(pred).flatten(-2)  # ... x HW bool
    gt_masks = gt.flatten(-2)  # ... x HW bool
    tp = (pred_masks & gt_masks).sum(dim=-1)  # ...
    fp = (pred_masks & ~gt_masks).sum(dim=-1)
    fn = (~pred_masks & gt_masks).sum(dim=-1)
    return torch.stack([tp, fp, fn], dim=-1)


@triton.jit
def _instance_counts_kernel(pred_ptr, gt_ptr, counts_ptr, hw, chunks, PRED_IS_LOGITS: tl.constexpr,
                            BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # pred: N x HW (uint8 0/1, or float logits), gt: N x HW uint8; program = (instance, chunk);
    # counts: N x 3 int64 (tp, fp, fn), zero-initialised, to which the program adds its chunk's.
    program = tl.program_id(0)
    instance = (program // chunks).to(tl.int64)
    base = instance * hw  # first pixel of the instance
    start = (program % chunks) * (BLOCK * ITERS)  # first pixel of the chunk in the instance (int32)
    tp_acc = tl.zeros([BLOCK], dtype=tl.int32)
    pred_acc = tl.zeros([BLOCK], dtype=tl.int32)
    gt_acc = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(ITERS):
        pixels = start + step * BLOCK + tl.arange(0, BLOCK)  # BLOCK, int32
        in_range = pixels < hw
        if PRED_IS_LOGITS:
            positive = tl.load(pred_ptr + base + pixels, mask=in_range, other=0.0) > 0.0  # NaN: False
        else:
            positive = tl.load(pred_ptr + base + pixels, mask=in_range, other=0) != 0
        truth = tl.load(gt_ptr + base + pixels, mask=in_range, other=0) != 0
        pred_acc += positive.to(tl.int32)
        gt_acc += truth.to(tl.int32)
        tp_acc += (positive & truth).to(tl.int32)
    tp = tl.sum(tp_acc, axis=0).to(tl.int64)
    out = counts_ptr + instance * 3
    # integer adds: exact in any order, so deterministic; no ordering with other memory needed
    tl.atomic_add(out, tp, sem="relaxed")
    tl.atomic_add(out + 1, tl.sum(pred_acc, axis=0).to(tl.int64) - tp, sem="relaxed")
    tl.atomic_add(out + 2, tl.sum(gt_acc, axis=0).to(tl.int64) - tp, sem="relaxed")


# 32 K pixels a program: 32 / 16 programs per 1024^2 mask; fewer steps when that gives under 4096
# programs (`resam_kernels.launch`: 8 x 50 masks of 256 x 256)
_BLOCK, _ITERS, _NUM_WARPS = 2048, 16, 4
_INTERPRET_BLOCK, _INTERPRET_ITERS = 4096, 2


def instance_counts_triton(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Triton version of `instance_counts_reference` (same result, no gradient)."""
    check_count_inputs(pred, gt)
    hw = pred.shape[-2] * pred.shape[-1]
    if hw >= MAX_MASK_PIXELS:
        raise UnsupportedByTriton(f"instance_counts_triton: masks of {pred.shape[-2]} x {pred.shape[-1]} pixels; "
                                  f"at most {MAX_MASK_PIXELS - 1} per mask")
    lead = pred.shape[:-2]
    num = lead.numel()
    flat_pred = pred.detach().contiguous().reshape(num, hw)  # N x HW
    if flat_pred.dtype == torch.bool:
        flat_pred = flat_pred.view(torch.uint8)
    flat_gt = gt.contiguous().reshape(num, hw).view(torch.uint8)  # N x HW
    block, iters = ((_INTERPRET_BLOCK, _INTERPRET_ITERS) if INTERPRET
                    else (_BLOCK, steps_per_program(num, hw, _BLOCK, _ITERS)))  # small batches: shorter chunks
    chunks = triton.cdiv(hw, block * iters)
    counts = torch.zeros((num, 3), dtype=torch.int64, device=pred.device)  # the programs add into it
    if num * chunks > 0:
        _instance_counts_kernel[(num * chunks,)](
            flat_pred, flat_gt, counts, hw, chunks, PRED_IS_LOGITS=flat_pred.is_floating_point(),
            BLOCK=block, ITERS=iters, num_warps=_NUM_WARPS)
    return counts.view(*lead, 3)
