"""Reinforce: the per-instance mask losses (focal, dice) and the IoU of the thresholded mask.

Specification, per instance mask (logits x and boolean target t over H x W pixels, float32
arithmetic whatever the input dtype):
    s = x (2t - 1),  p = sigmoid(x)
    focal = mean_pixels alpha_t sigmoid(-s)^gamma softplus(-s)     (alpha_t = alpha if t else 1 - alpha)
    dice  = 1 - (2 I + smooth) / (P + T + smooth),  I = sum p t,  P = sum p,  T = sum t
    iou   = |(x > 0) & t| / |(x > 0) | t|  (1 when both masks are empty; no gradient)
with alpha = 0.25, gamma = 2, smooth = 1. `focal_per_instance`, `dice_per_instance` and
`mask_iou` are that specification in torch (the training losses in `resam_dist.resam.losses`
use them, through `mask_loss_terms_reference` or the fused path); `mask_loss_terms_reference`
returns the three.

`mask_loss_terms_triton` computes the same with three kernel launches (two forward, one
backward) and saves only the logits, the target and two floats per instance (I and
D = P + T + smooth) for the backward (the torch reference keeps several N x H x W float32
intermediates):
- forward: grid = N instances x C chunks of CHUNK = BLOCK * ITERS pixels (flattened to 1-D).
  A program streams its chunk in BLOCK-pixel steps, keeps lane-wise float32 sums of the focal
  terms, p t and p and int32 counts of t, (x > 0) & t and (x > 0) | t in registers, and writes
  one partial per chunk (N x 6 x C). One read of logits and target.
- finalize (`finalize_terms`): one program per BLOCK_N instances sums their C partials in a
  fixed order (deterministic, no atomics, no host synchronisation) and writes focal and dice
  (2 x N float32, the outputs are its rows), the IoU (N float32) and I, D (N x 2 float32,
  saved). Nothing else runs on the device in the forward but these two launches (and, for
  non-contiguous inputs, their copy).
- backward: the same grid as the forward; each program reads its instance's upstream gradients
  and saved I, D and forms the coefficients a = g_focal / HW, b = g_dice (2 I + smooth) / D^2,
  c = 2 g_dice / D itself (a missing upstream gradient is a compile-time 0: nothing allocated),
  then every pixel gets  d/dx = a dfocal/dx + (b - c t) p (1 - p)  in the logits dtype. One
  launch: one read of logits and target, one write of the gradient.

Derivation of the focal term's derivative. With q = sigmoid(-s) (so 1 - q = sigmoid(s)),
dq/ds = -q (1 - q) and d softplus(-s)/ds = -q, hence
    d/ds [alpha_t q^gamma softplus(-s)] = -alpha_t q^gamma (gamma (1 - q) softplus(-s) + q)
and ds/dx = 2t - 1. Dice: d dice/dp = ((2 I + smooth) - 2 t D) / D^2 and dp/dx = p (1 - p).

Stable forms: with e = exp(-|x|), sigmoid(|x|) = 1 / (1 + e) and sigmoid(-|x|) = e / (1 + e)
(q, 1 - q, p and p (1 - p) are picked from these without cancellation); softplus(-s) =
max(-s, 0) + log1p(e) with log1p(e) = log(u) e / (u - 1), u = 1 + e (e when u rounds to 1).
gamma = 2 is q * q. The kernels use exp2/log2.

Non-finite logits. NaN logits make the instance's focal and dice NaN (as in the reference) and
count as "not > 0" for the IoU; the gradient of that instance is NaN. An infinite logit on the
target's side costs 0 focal loss; one on the wrong side gives an infinite focal loss (as in the
reference) and a NaN gradient at that pixel (the reference's autograd gives NaN there too:
0 * inf). Empty inputs: N = 0 gives empty outputs; H W = 0 gives focal NaN (mean of nothing),
dice 0 and IoU 1, like the reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resam_kernels.launch import UnsupportedByTriton, refuse_differentiable_backward, steps_per_program

# Read once at import: Triton's interpreter must be switched on before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DICE_SMOOTH = 1.0
MAX_MASK_PIXELS = 1 << 30  # H W below this: pixel offsets inside a mask stay int32 in the kernels


def _no_autocast(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


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


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of boolean masks over the last two dims: ... x H x W -> ... float32.
    Two empty masks agree perfectly (IoU 1)."""
    intersection = (pred & target).flatten(-2).sum(dim=-1).float()
    union = (pred | target).flatten(-2).sum(dim=-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1.0), torch.ones_like(union))


def check_mask_loss_inputs(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.dim() < 2 or logits.shape != target.shape or target.dtype != torch.bool:
        raise ValueError(f"mask_loss_terms needs logits ... x H x W and a bool target of the same shape, "
                         f"got {tuple(logits.shape)} and {tuple(target.shape)} {target.dtype}")


def check_triton_sizes(logits: torch.Tensor) -> None:
    """The kernels index the pixels of one mask in int32 (the instance offset is int64)."""
    if logits.shape[-2] * logits.shape[-1] >= MAX_MASK_PIXELS:
        raise UnsupportedByTriton(f"mask_loss_terms_triton: masks of {logits.shape[-2]} x {logits.shape[-1]} "
                                  f"pixels; at most {MAX_MASK_PIXELS - 1} per mask")


def mask_loss_terms_reference(logits: torch.Tensor, target: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ... x H x W (fp32/bf16/fp16), target ... x H x W bool -> (focal, dice, iou), each
    ... float32; iou from the detached logits (no gradient)."""
    check_mask_loss_inputs(logits, target)
    with torch.no_grad():
        iou = mask_iou(logits.detach() > 0, target)
    return focal_per_instance(logits, target), dice_per_instance(logits, target), iou


@triton.jit
def _log2(u, FAST_LOG: tl.constexpr):
    """log2 of u in [1, 2] (or NaN): NVIDIA's lg2.approx instead of libdevice's log2f (a branchy
    polynomial: most of the kernels' instructions); the interpreter (no inline assembly) and
    non-NVIDIA GPUs take tl.log2. lg2.approx's error is absolute (about 2^-22 on [1, 2]), so
    log1p(e) = log2(1 + e) ln 2 e / ((1 + e) - 1) loses relative accuracy as e -> 0 (|x| above
    about 10). Those pixels are the confidently right ones: their focal terms and gradients are
    below about e^3 < 1e-12 and their dice probabilities are exact, so the losses do not see it."""
    if FAST_LOG:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.log2(u)


@triton.jit
def _pixel_terms(x, t, FAST_LOG: tl.constexpr):
    """Per pixel (float32 x, int1 t): q = sigmoid(-s), 1 - q, softplus(-s), p, p (1 - p)."""
    e = tl.exp2(-tl.abs(x) * 1.4426950408889634)  # exp(-|x|), in (0, 1]; NaN stays NaN
    u = 1.0 + e
    big = 1.0 / u  # sigmoid(|x|)
    small = e * big  # sigmoid(-|x|)
    signed = tl.where(t, x, -x)  # s
    q = tl.where(signed >= 0.0, small, big)  # sigmoid(-s)
    q_rest = tl.where(signed >= 0.0, big, small)  # sigmoid(s) = 1 - q
    # log1p(e) = ln(u) e / (u - 1); e itself where u rounds to 1 (the clamp only keeps the
    # unselected branch finite)
    log1p_e = tl.where(u == 1.0, e, _log2(u, FAST_LOG) * 0.6931471805599453 * e
                       / tl.maximum(u - 1.0, 1e-30))
    softplus = tl.maximum(-signed, 0.0) + log1p_e  # softplus(-s) = BCE
    p = tl.where(x >= 0.0, big, small)  # sigmoid(x)
    return q, q_rest, softplus, p, big * small


@triton.jit
def _pixel_gradient(x, t, coef_focal, coef_dice, coef_dice_t, ALPHA: tl.constexpr, FAST_LOG: tl.constexpr,
                    HAS_FOCAL: tl.constexpr):
    """d/dx of coef_focal focal_term + dice part at each pixel (float32 x, int1 t):
    a dfocal/dx + (b - c t) p (1 - p) with (a, b, c) = (coef_focal, coef_dice, coef_dice_t).
    Without HAS_FOCAL the focal derivative is not formed at all (at an infinite logit on the
    wrong side it is NaN, and 0 x NaN would be NaN)."""
    q, q_rest, softplus, p, p_dp = _pixel_terms(x, t, FAST_LOG)
    grad = (coef_dice - tl.where(t, coef_dice_t, 0.0)) * p_dp
    if HAS_FOCAL:
        alpha_t = tl.where(t, ALPHA, 1.0 - ALPHA)
        d_focal_ds = -alpha_t * q * q * (2.0 * q_rest * softplus + q)  # gamma = 2
        grad += coef_focal * tl.where(t, d_focal_ds, -d_focal_ds)
    return grad


@triton.jit
def _chunk_origin(hw, chunks, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    """Program -> (program, instance, offset of its instance's first pixel (int64), offset of its
    chunk's first pixel in the instance (int32: H W < 2^30 is checked on the host))."""
    program = tl.program_id(0)
    instance = program // chunks
    return program, instance, instance.to(tl.int64) * hw, (program % chunks) * (BLOCK * ITERS)


@triton.jit
def _load_step(logits_ptr, target_ptr, start, step, hw, BLOCK: tl.constexpr):
    """Pixels start + step BLOCK + [0, BLOCK) of one instance (pointers already at its first
    pixel) -> (in range, logits float32 (0 outside), target int1 (False outside)), BLOCK each."""
    pixels = start + step * BLOCK + tl.arange(0, BLOCK)  # BLOCK, int32
    in_range = pixels < hw
    x = tl.load(logits_ptr + pixels, mask=in_range, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + pixels, mask=in_range, other=0) != 0
    return pixels, in_range, x, t


@triton.jit
def _store_partial(sums_ptr, counts_ptr, program, chunks, focal_acc, inter_acc, prob_acc, t_acc, hit_acc,
                   union_acc):
    """Reduce a program's lane-wise accumulators (any block shape) and write them as the partial of
    chunk program % chunks of instance program // chunks into partials N x 6 x chunks: fields
    0 .. 2 (focal terms, p t, p) through sums_ptr (float32), 3 .. 5 (t, (x > 0) & t, (x > 0) | t)
    through counts_ptr (the same buffer as int32)."""
    at = (program // chunks).to(tl.int64) * (6 * chunks) + program % chunks
    tl.store(sums_ptr + at, tl.sum(focal_acc))
    tl.store(sums_ptr + at + chunks, tl.sum(inter_acc))
    tl.store(sums_ptr + at + 2 * chunks, tl.sum(prob_acc))
    tl.store(counts_ptr + at + 3 * chunks, tl.sum(t_acc))
    tl.store(counts_ptr + at + 4 * chunks, tl.sum(hit_acc))
    tl.store(counts_ptr + at + 5 * chunks, tl.sum(union_acc))


@triton.jit
def _mask_loss_forward_kernel(logits_ptr, target_ptr, sums_ptr, counts_ptr, hw, chunks,
                              ALPHA: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
                              FAST_LOG: tl.constexpr):
    # logits: N x HW (fp32/bf16/fp16), target: N x HW uint8; program = (instance, chunk), one
    # partial per program into partials N x 6 x chunks (`_store_partial`).
    program, instance, base, start = _chunk_origin(hw, chunks, BLOCK, ITERS)
    focal_acc = tl.zeros([BLOCK], dtype=tl.float32)
    inter_acc = tl.zeros([BLOCK], dtype=tl.float32)
    prob_acc = tl.zeros([BLOCK], dtype=tl.float32)
    t_acc = tl.zeros([BLOCK], dtype=tl.int32)
    hit_acc = tl.zeros([BLOCK], dtype=tl.int32)
    union_acc = tl.zeros([BLOCK], dtype=tl.int32)
    for step in range(ITERS):
        _, in_range, x, t = _load_step(logits_ptr + base, target_ptr + base, start, step, hw, BLOCK)
        q, q_rest, softplus, p, p_dp = _pixel_terms(x, t, FAST_LOG)
        alpha_t = tl.where(t, ALPHA, 1.0 - ALPHA)
        focal_acc += tl.where(in_range, alpha_t * q * q * softplus, 0.0)
        inter_acc += tl.where(t, p, 0.0)  # out of range: t is False
        prob_acc += tl.where(in_range, p, 0.0)
        positive = x > 0.0  # False for NaN and out of range (x = 0)
        t_acc += t.to(tl.int32)
        hit_acc += (positive & t).to(tl.int32)
        union_acc += (positive | t).to(tl.int32)
    _store_partial(sums_ptr, counts_ptr, program, chunks, focal_acc, inter_acc, prob_acc, t_acc, hit_acc,
                   union_acc)


@triton.jit
def _mask_loss_finalize_kernel(sums_ptr, counts_ptr, losses_ptr, iou_ptr, saved_ptr, num, chunks, hw,
                               SMOOTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # partials: N x 6 x chunks (`_store_partial`; sums_ptr float32, counts_ptr the same buffer as
    # int32); program = BLOCK_N instances, summing their partials BLOCK_C chunks a step (a fixed
    # order); losses: 2 x N float32 (focal, dice), iou: N float32, saved: N x 2 float32 (I, D).
    instances = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N, int32
    valid = instances < num
    rows = instances.to(tl.int64) * (6 * chunks)  # BLOCK_N: each instance's first partial
    focal_acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    inter_acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    prob_acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    t_acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32)  # sums up to HW < 2^30: int32
    hit_acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32)
    union_acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.int32)
    for first in range(0, chunks, BLOCK_C):
        chunk = first + tl.arange(0, BLOCK_C)  # BLOCK_C
        mask = valid[:, None] & (chunk < chunks)[None, :]  # BLOCK_N x BLOCK_C
        at = rows[:, None] + chunk[None, :]  # BLOCK_N x BLOCK_C
        focal_acc += tl.load(sums_ptr + at, mask=mask, other=0.0)
        inter_acc += tl.load(sums_ptr + at + chunks, mask=mask, other=0.0)
        prob_acc += tl.load(sums_ptr + at + 2 * chunks, mask=mask, other=0.0)
        t_acc += tl.load(counts_ptr + at + 3 * chunks, mask=mask, other=0)
        hit_acc += tl.load(counts_ptr + at + 4 * chunks, mask=mask, other=0)
        union_acc += tl.load(counts_ptr + at + 5 * chunks, mask=mask, other=0)
    intersection = tl.sum(inter_acc, axis=1)  # BLOCK_N
    denominator = tl.sum(prob_acc, axis=1) + tl.sum(t_acc, axis=1).to(tl.float32) + SMOOTH  # D
    hits = tl.sum(hit_acc, axis=1).to(tl.float32)
    union = tl.sum(union_acc, axis=1).to(tl.float32)
    # HW = 0 (no chunk): NaN, like the reference's mean of nothing (without evaluating 0 / 0)
    focal = tl.where(hw > 0, tl.sum(focal_acc, axis=1) / tl.maximum(hw, 1), float("nan"))
    dice = 1.0 - (2.0 * intersection + SMOOTH) / denominator
    # IEEE-rounded division (Triton's "/" is approximate on the GPU): the same IoU as torch's
    iou = tl.where(union > 0.0, tl.div_rn(hits, tl.maximum(union, 1.0)), 1.0)
    out = instances.to(tl.int64)  # BLOCK_N
    tl.store(losses_ptr + out, focal, mask=valid)
    tl.store(losses_ptr + out + num, dice, mask=valid)
    tl.store(iou_ptr + out, iou, mask=valid)
    tl.store(saved_ptr + 2 * out, intersection, mask=valid)
    tl.store(saved_ptr + 2 * out + 1, denominator, mask=valid)


@triton.jit
def _gradient_coefficients(grad_focal_ptr, grad_dice_ptr, saved_ptr, focal_stride, dice_stride, instance, hw,
                           SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr, HAS_DICE: tl.constexpr):
    """One instance's (a, b, c) = (g_focal / HW, g_dice (2 I + smooth) / D^2, 2 g_dice / D) from
    its upstream gradients (element instance of each, at the given strides, any float dtype;
    0 where HAS_FOCAL / HAS_DICE is off: nothing is read) and its saved I, D (N x 2 float32).
    HW > 0: no program runs otherwise."""
    row = instance.to(tl.int64)
    coef_focal = 0.0
    coef_dice = 0.0
    coef_dice_t = 0.0
    if HAS_FOCAL:
        coef_focal = tl.load(grad_focal_ptr + row * focal_stride).to(tl.float32) / hw
    if HAS_DICE:
        grad_dice = tl.load(grad_dice_ptr + row * dice_stride).to(tl.float32)
        intersection = tl.load(saved_ptr + 2 * row)
        denominator = tl.load(saved_ptr + 2 * row + 1)
        coef_dice = grad_dice * (2.0 * intersection + SMOOTH) / (denominator * denominator)
        coef_dice_t = grad_dice * 2.0 / denominator
    return coef_focal, coef_dice, coef_dice_t


@triton.jit
def _mask_loss_backward_kernel(logits_ptr, target_ptr, grad_ptr, grad_focal_ptr, grad_dice_ptr, saved_ptr,
                               focal_stride, dice_stride, hw, chunks, ALPHA: tl.constexpr,
                               SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr, HAS_DICE: tl.constexpr,
                               BLOCK: tl.constexpr, ITERS: tl.constexpr, FAST_LOG: tl.constexpr):
    # upstream gradients: N each (strided), saved: N x 2 float32 (I, D); grad = a dfocal/dx +
    # (b - c t) p (1 - p) (`_gradient_coefficients`), N x HW in the logits dtype.
    _, instance, base, start = _chunk_origin(hw, chunks, BLOCK, ITERS)
    coef_focal, coef_dice, coef_dice_t = _gradient_coefficients(
        grad_focal_ptr, grad_dice_ptr, saved_ptr, focal_stride, dice_stride, instance, hw, SMOOTH, HAS_FOCAL,
        HAS_DICE)
    for step in range(ITERS):
        pixels, in_range, x, t = _load_step(logits_ptr + base, target_ptr + base, start, step, hw, BLOCK)
        grad = _pixel_gradient(x, t, coef_focal, coef_dice, coef_dice_t, ALPHA, FAST_LOG, HAS_FOCAL)
        tl.store(grad_ptr + base + pixels, grad.to(grad_ptr.dtype.element_ty), mask=in_range)


# BLOCK pixels a step (4 warps: 8 per thread, two 16-byte fp32 loads) and ITERS steps a program:
# 16384 pixels, so a 1024 x 1024 mask is 64 programs (200 of them: 12800 programs, ~100 per SM)
# and a partial costs 24 bytes against 16384 x (4 + 1) bytes read; fewer steps when that gives
# under 4096 programs (`resam_kernels.launch`: 8 x 50 masks of 256 x 256). The interpreter runs one
# numpy call per block operation: there bigger steps are much faster (two steps a program, so
# that the tests still cover the loop and partial last steps and chunks).
# lg2.approx is PTX: NVIDIA GPUs only (a ROCm build also reports tensors as CUDA)
FAST_LOG = not INTERPRET and torch.version.hip is None
_BLOCK, _ITERS, _NUM_WARPS = 1024, 16, 4
_INTERPRET_BLOCK, _INTERPRET_ITERS = 4096, 2
# finalize: 32 instances x 32 chunks a step, 4 warps (8 partials of each field a thread); 8 x 50
# masks of 256 x 256 (16 chunks each) are 13 programs of one step, 4 x 50 of 1024 x 1024 (64
# chunks) 7 programs of two steps
_FINALIZE_BLOCK_N, _FINALIZE_BLOCK_C, _FINALIZE_WARPS = 32, 32, 4


def _launch_shape(num: int, hw: int) -> tuple[int, int]:
    """(BLOCK, ITERS) of the forward and backward kernels for num instances of hw pixels (fewer
    steps a program for small batches, `resam_kernels.launch`)."""
    if INTERPRET:
        return _INTERPRET_BLOCK, _INTERPRET_ITERS
    return _BLOCK, steps_per_program(num, hw, _BLOCK, _ITERS)


def _flat(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    hw = logits.shape[-2] * logits.shape[-1]
    num = logits.shape[:-2].numel()
    flat_logits = logits.detach().contiguous().reshape(num, hw)  # N x HW
    flat_target = target.contiguous().reshape(num, hw).view(torch.uint8)  # N x HW
    return flat_logits, flat_target, hw


def new_partials(num: int, chunks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernels' partials N x 6 x chunks (`_store_partial`), one allocation: (float32,
    the same memory as int32). Every program writes its own, so no fill."""
    partials = torch.empty((num, 6, chunks), dtype=torch.float32, device=device)
    return partials, partials.view(torch.int32)


def finalize_terms(sums: torch.Tensor, counts: torch.Tensor, hw: int, lead: torch.Size
                   ) -> tuple[torch.Tensor, ...]:
    """Partials (`new_partials`, filled by a forward kernel) of masks of hw pixels -> (focal, dice,
    iou), each `lead` float32, and saved = (I, D) N x 2 float32 for the backward. One launch (none
    for N = 0) and three allocations: focal and dice are the rows of one 2 x N buffer (changing
    either in place is refused by autograd anyway), while the IoU, which has no gradient and may
    be changed in place, shares its buffer (and so its version counter) with neither them nor
    the saved values."""
    num, _, chunks = sums.shape
    losses = torch.empty((2, *lead), dtype=torch.float32, device=sums.device)
    iou = torch.empty(lead, dtype=torch.float32, device=sums.device)
    saved = torch.empty((num, 2), dtype=torch.float32, device=sums.device)
    if num > 0:
        _mask_loss_finalize_kernel[(triton.cdiv(num, _FINALIZE_BLOCK_N),)](
            sums, counts, losses, iou, saved, num, chunks, hw, SMOOTH=DICE_SMOOTH, BLOCK_N=_FINALIZE_BLOCK_N,
            BLOCK_C=_FINALIZE_BLOCK_C, num_warps=_FINALIZE_WARPS)
    focal, dice = losses.unbind(0)
    return focal, dice, iou, saved


def coefficient_args(grad_focal: torch.Tensor | None, grad_dice: torch.Tensor | None, saved: torch.Tensor
                     ) -> tuple[tuple, dict]:
    """Upstream gradients of focal and dice (`lead` or None) and saved (N x 2) -> the backward
    kernels' arguments for `_gradient_coefficients`: (grad_focal, grad_dice, saved, focal stride,
    dice stride) (N-element views: no copy unless the strides forbid one; saved stands in for a
    None gradient's pointer, never read) and the flags HAS_FOCAL, HAS_DICE."""
    num = saved.shape[0]
    focal = saved if grad_focal is None else grad_focal.reshape(num)  # N
    dice = saved if grad_dice is None else grad_dice.reshape(num)  # N
    strides = (0 if grad_focal is None else focal.stride(0), 0 if grad_dice is None else dice.stride(0))
    return (focal, dice, saved) + strides, {"HAS_FOCAL": grad_focal is not None, "HAS_DICE": grad_dice is not None}


def mask_loss_forward_triton(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """-> (focal, dice, iou), each `lead` float32 (the leading dims), and saved = (I, D) N x 2
    float32 (N = number of instances). Two launches: the partials, `finalize_terms`."""
    flat_logits, flat_target, hw = _flat(logits, target)
    num = flat_logits.shape[0]
    block, iters = _launch_shape(num, hw)
    chunks = triton.cdiv(hw, block * iters)
    sums, counts = new_partials(num, chunks, logits.device)
    if num * chunks > 0:
        _mask_loss_forward_kernel[(num * chunks,)](
            flat_logits, flat_target, sums, counts, hw, chunks, ALPHA=FOCAL_ALPHA, BLOCK=block,
            ITERS=iters, FAST_LOG=FAST_LOG, num_warps=_NUM_WARPS)
    return finalize_terms(sums, counts, hw, logits.shape[:-2])


class MaskLossFunction(torch.autograd.Function):
    """Fused focal / dice / IoU; saves logits, target and I, D (N x 2 float32)."""

    @staticmethod
    def forward(ctx, logits, target):
        focal, dice, iou, saved = mask_loss_forward_triton(logits, target)
        ctx.save_for_backward(logits, target, saved)
        ctx.mark_non_differentiable(iou)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return focal, dice, iou

    @staticmethod
    def backward(ctx, grad_focal, grad_dice, grad_iou):
        refuse_differentiable_backward("mask_loss_terms")
        logits, target, saved = ctx.saved_tensors
        flat_logits, flat_target, hw = _flat(logits, target)
        num = flat_logits.shape[0]
        upstream, flags = coefficient_args(grad_focal, grad_dice, saved)
        grad = torch.empty_like(flat_logits)  # N x HW, logits dtype
        block, iters = _launch_shape(num, hw)
        chunks = triton.cdiv(hw, block * iters)
        if num * chunks > 0:
            _mask_loss_backward_kernel[(num * chunks,)](
                flat_logits, flat_target, grad, *upstream, hw, chunks, ALPHA=FOCAL_ALPHA, SMOOTH=DICE_SMOOTH,
                BLOCK=block, ITERS=iters, FAST_LOG=FAST_LOG, num_warps=_NUM_WARPS, **flags)
        return grad.reshape(logits.shape), None


def mask_loss_terms_triton(logits: torch.Tensor, target: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused Triton version of `mask_loss_terms_reference` (same outputs and gradient)."""
    check_mask_loss_inputs(logits, target)
    check_triton_sizes(logits)
    return MaskLossFunction.apply(logits, target)
