"""Reinforce's mask losses on the 4x bilinear upsampling of low-res mask logits.

Specification (`upsampled_mask_loss_terms_reference`): for float32 low-res logits ... x h x w and
a bool target ... x 4h x 4w,
    upsampled_mask_loss_terms(low_res, target) = mask_loss_terms(upsample4x(low_res), target)
i.e. (focal, dice, iou) per instance as `resam_kernels.mask_loss` defines them, of the logits that
`resam_kernels.upsample` defines (bilinear, align_corners=False), with the gradient with respect
to the low-res logits. An empty plane (h w = 0) upsamples to the empty 4h x 4w plane (F.interpolate
refuses it): focal NaN (the mean of nothing), dice 0, IoU 1, as `mask_loss` gives.

Why: the student's full-resolution logits (ViT-B step: 4 images x 50 instances x 1024 x 1024
float32 = 800 MiB) and their gradient (another 800 MiB) are both live when the loss's backward
starts, the training step's memory peak (H200 run 9, benchmarks/memory_peak.py). Computing the
loss from the low-res logits (200 x 256 x 256) never writes either.

`upsampled_mask_loss_terms_triton` computes the same with two kernels that never materialise a
full-resolution float tensor (plus `mask_loss`'s finalize kernel: three launches in all); the
backward saves only low_res, the target and two floats per instance (I and D = P + T + smooth).
Both kernels work on tiles of BLOCK_I x BLOCK_J low-res pixels of one instance (grid = N instances
x tiles, one program each, one grid axis):
- neighbourhood: along an axis of n low-res pixels, full-res pixel o samples s(o) =
  max((o + 0.5) / 4 - 0.5, 0), taps i0 = floor(s), i1 = min(i0 + 1, n - 1), weight l = s - i0
  (`resam_kernels.upsample._source`). For o = 4i - 2 + a with a in 0 .. 7 (and so for o = 4i + a,
  a in 0 .. 3) s = i + (2a - 7) / 8 before the clamp, so i0 is i - 1 or i and i1 is i or i + 1:
  every logit a program needs is a bilinear combination of the 3 x 3 low-res pixels around
  (i, j), read once (9 loads, indices clamped to the plane, so the clamped taps come out right).
  x(o, p) is formed as in the upsample kernel: rows first, (1 - lx) v[.., x0] + lx v[.., x1] for
  the three neighbour rows, then (1 - ly) top + ly bottom with top = row i - 1 where i0 < i (else
  row i) and bottom = row i + 1 where i1 > i (else row i).
- forward: each low-res pixel (i, j) covers the 4 x 4 full-res pixels o = 4i .. 4i + 3,
  p = 4j .. 4j + 3; the program evaluates their logits (16 steps over its tile), reads the
  target there (bool as uint8) and keeps the same lane-wise sums as
  `resam_kernels.mask_loss._mask_loss_forward_kernel` (float32 focal terms, p t, p; int32 counts
  of t, (x > 0) & t, (x > 0) | t), one partial per program (N x 6 x tiles,
  `mask_loss._store_partial`), which `mask_loss.finalize_terms` (one more launch) sums in a fixed
  order into focal, dice, IoU and the saved I, D. One read of the target and of the (4x4
  smaller, cached) low-res logits, nothing of full-res size written.
- backward: each program forms its instance's coefficients a, b, c from the upstream gradients
  and the saved I, D exactly as `mask_loss`'s backward kernel does
  (`mask_loss._gradient_coefficients`, one launch in all), and the full-res gradient
      g(o, p) = a dfocal/dx + (b - c t) p (1 - p)     (`mask_loss._pixel_gradient`)
  is never stored: since x = sum_{i, j} hat(o, i) hat(p, j) X[i, j] (`resam_kernels.upsample`),
      dL/dX[i, j] = sum_{o, p} hat(o, i) hat(p, j) g(o, p),
  and hat(o, i) = 0 unless |min(s(o), n - 1) - i| < 1, i.e. unless o is in 4i - 2 .. 4i + 5
  (s(4i - 3) = i - 1.125 and s(4i + 6) = i + 1.125; the clamps only move s towards i at the
  borders, and o outside [0, 4n) does not exist). So each low-res pixel gathers over its 8 x 8
  full-res pixels (64 steps over the tile), recomputing x there from the neighbourhood and
  reading t, with the weights hat(o, i) hat(p, j) of the upsample kernel's backward (which
  handle the borders). Deterministic, no atomics; one write of the low-res gradient. Every
  full-res pixel is evaluated by the 2 x 2 low-res pixels whose windows contain it: 4x the
  forward's per-pixel arithmetic, traded for never storing g.
Launch shapes: see `_BLOCK_I` below (runtime loops over the 16 / 64 offsets). Empty inputs
behave as in `mask_loss`: N = 0 gives empty outputs; h w = 0 gives focal NaN, dice 0, IoU 1
and an empty gradient.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from resam_kernels.launch import refuse_differentiable_backward
from resam_kernels.mask_loss import (DICE_SMOOTH, FAST_LOG, FOCAL_ALPHA, _gradient_coefficients, _pixel_gradient,
                                     _pixel_terms, _store_partial, check_triton_sizes, coefficient_args,
                                     finalize_terms, mask_loss_terms_reference, new_partials)
from resam_kernels.upsample import _hat, _source, upsample4x_reference

# Read once at import: Triton's interpreter must be switched on before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_upsampled_inputs(low_res: torch.Tensor, target: torch.Tensor) -> None:
    if (low_res.dim() < 2 or low_res.dtype != torch.float32 or target.dtype != torch.bool
            or target.shape != (*low_res.shape[:-2], 4 * low_res.shape[-2], 4 * low_res.shape[-1])):
        raise ValueError(f"upsampled_mask_loss_terms needs float32 low-res logits ... x h x w and a bool "
                         f"target ... x 4h x 4w, got {low_res.dtype} {tuple(low_res.shape)} and "
                         f"{target.dtype} {tuple(target.shape)}")


def _upsampled(low_res: torch.Tensor, upsample) -> torch.Tensor:
    """... x h x w -> ... x 4h x 4w through `upsample` (N x 1 x h x w planes)."""
    height, width = low_res.shape[-2:]
    planes = low_res.reshape(low_res.shape[:-2].numel(), 1, height, width)  # N x 1 x h x w
    if height * width == 0:  # F.interpolate refuses empty planes; their upsampling is empty too
        upsampled = planes.repeat(1, 1, 4, 4)  # N x 1 x 4h x 4w, no element
    else:
        upsampled = upsample(planes)  # N x 1 x 4h x 4w
    return upsampled.reshape(*low_res.shape[:-2], 4 * height, 4 * width)


def upsampled_mask_loss_terms_reference(low_res: torch.Tensor, target: torch.Tensor
                                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """low_res ... x h x w float32, target ... x 4h x 4w bool -> (focal, dice, iou), each ...
    float32; focal and dice differentiable wrt low_res, iou not."""
    check_upsampled_inputs(low_res, target)
    return mask_loss_terms_reference(_upsampled(low_res, upsample4x_reference), target)


@triton.jit
def _tile_origin(h, w, tiles, tiles_j, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    """Program -> (program, instance, low-res rows i (BLOCK_I), columns j (BLOCK_J), int32)."""
    program = tl.program_id(0)
    instance = program // tiles
    tile = program % tiles
    i = (tile // tiles_j) * BLOCK_I + tl.arange(0, BLOCK_I)  # BLOCK_I
    j = (tile % tiles_j) * BLOCK_J + tl.arange(0, BLOCK_J)  # BLOCK_J
    return program, instance, i, j


@triton.jit
def _neighbourhood(low_ptr, i, j, h, w):
    """The 3 x 3 low-res logits around each (i, j) of a tile (indices clamped to the h x w plane,
    low_ptr at the instance's first pixel): v[row][column], rows i - 1, i, i + 1 (up, mid, down),
    each BLOCK_I x BLOCK_J float32 (0 outside the plane)."""
    valid = (i < h)[:, None] & (j < w)[None, :]  # BLOCK_I x BLOCK_J
    up = tl.maximum(i - 1, 0)[:, None] * w
    mid = i[:, None] * w
    down = tl.minimum(i + 1, h - 1)[:, None] * w
    left = tl.maximum(j - 1, 0)[None, :]
    centre = j[None, :]
    right = tl.minimum(j + 1, w - 1)[None, :]
    v_ul = tl.load(low_ptr + up + left, mask=valid, other=0.0)
    v_um = tl.load(low_ptr + up + centre, mask=valid, other=0.0)
    v_ur = tl.load(low_ptr + up + right, mask=valid, other=0.0)
    v_ml = tl.load(low_ptr + mid + left, mask=valid, other=0.0)
    v_mm = tl.load(low_ptr + mid + centre, mask=valid, other=0.0)
    v_mr = tl.load(low_ptr + mid + right, mask=valid, other=0.0)
    v_dl = tl.load(low_ptr + down + left, mask=valid, other=0.0)
    v_dm = tl.load(low_ptr + down + centre, mask=valid, other=0.0)
    v_dr = tl.load(low_ptr + down + right, mask=valid, other=0.0)
    return v_ul, v_um, v_ur, v_ml, v_mm, v_mr, v_dl, v_dm, v_dr


@triton.jit
def _row_values(v_left, v_centre, v_right, ox, j, w):
    """Horizontal interpolation of one neighbour row at full-res columns ox (BLOCK_J, all in
    4j - 2 .. 4j + 5): (1 - lx) v[x0] + lx v[x1], x0 in {j - 1, j}, x1 in {j, j + 1}."""
    x0, x1, lx = _source(ox, w)
    first = tl.where((x0 < j)[None, :], v_left, v_centre)
    second = tl.where((x1 > j)[None, :], v_right, v_centre)
    weight = lx[None, :]
    return (1.0 - weight) * first + weight * second


@triton.jit
def _logits(row_up, row_mid, row_down, oy, i, h):
    """Full-res logits at rows oy (BLOCK_I, all in 4i - 2 .. 4i + 5) from the three horizontally
    interpolated neighbour rows: (1 - ly) row[y0] + ly row[y1]."""
    y0, y1, ly = _source(oy, h)
    top = tl.where((y0 < i)[:, None], row_up, row_mid)
    bottom = tl.where((y1 > i)[:, None], row_down, row_mid)
    weight = ly[:, None]
    return (1.0 - weight) * top + weight * bottom


@triton.jit
def _upsampled_loss_forward_kernel(low_ptr, target_ptr, sums_ptr, counts_ptr, h, w, tiles, tiles_j,
                                   ALPHA: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                                   FAST_LOG: tl.constexpr):
    # low: N x h x w float32, target: N x 4h x 4w uint8; program = (instance, tile of low-res
    # pixels); one partial per program into partials N x 6 x tiles (`mask_loss._store_partial`),
    # over the 4 x 4 full-res pixels of each low-res pixel of the tile.
    program, instance, i, j = _tile_origin(h, w, tiles, tiles_j, BLOCK_I, BLOCK_J)
    out_w = 4 * w
    low = low_ptr + instance.to(tl.int64) * h * w
    tgt = target_ptr + instance.to(tl.int64) * (16 * h * w)
    v_ul, v_um, v_ur, v_ml, v_mm, v_mr, v_dl, v_dm, v_dr = _neighbourhood(low, i, j, h, w)
    valid = (i < h)[:, None] & (j < w)[None, :]  # BLOCK_I x BLOCK_J: o < 4h and p < 4w
    focal_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    inter_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    prob_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    t_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
    hit_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
    union_acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.int32)
    for b in range(4):
        ox = 4 * j + b  # BLOCK_J full-res columns
        row_up = _row_values(v_ul, v_um, v_ur, ox, j, w)
        row_mid = _row_values(v_ml, v_mm, v_mr, ox, j, w)
        row_down = _row_values(v_dl, v_dm, v_dr, ox, j, w)
        for a in range(4):
            oy = 4 * i + a  # BLOCK_I full-res rows
            x = _logits(row_up, row_mid, row_down, oy, i, h)  # BLOCK_I x BLOCK_J
            t = tl.load(tgt + oy[:, None] * out_w + ox[None, :], mask=valid, other=0) != 0
            q, q_rest, softplus, p, p_dp = _pixel_terms(x, t, FAST_LOG)
            alpha_t = tl.where(t, ALPHA, 1.0 - ALPHA)
            focal_acc += tl.where(valid, alpha_t * q * q * softplus, 0.0)
            inter_acc += tl.where(t, p, 0.0)  # outside: t is False
            prob_acc += tl.where(valid, p, 0.0)
            positive = x > 0.0  # False for NaN and outside the plane (x = 0 there)
            t_acc += t.to(tl.int32)
            hit_acc += (positive & t).to(tl.int32)
            union_acc += (positive | t).to(tl.int32)
    _store_partial(sums_ptr, counts_ptr, program, tiles, focal_acc, inter_acc, prob_acc, t_acc, hit_acc,
                   union_acc)


@triton.jit
def _upsampled_loss_backward_kernel(low_ptr, target_ptr, grad_ptr, grad_focal_ptr, grad_dice_ptr, saved_ptr,
                                    focal_stride, dice_stride, h, w, tiles, tiles_j, ALPHA: tl.constexpr,
                                    SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr, HAS_DICE: tl.constexpr,
                                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, FAST_LOG: tl.constexpr):
    # upstream gradients: N each (strided), saved: N x 2 float32 (I, D); grad: N x h x w float32,
    # each low-res pixel the hat-weighted sum of the full-res gradient g = a dfocal/dx +
    # (b - c t) p (1 - p) (`mask_loss._gradient_coefficients`) over its 8 x 8 window.
    _, instance, i, j = _tile_origin(h, w, tiles, tiles_j, BLOCK_I, BLOCK_J)
    out_h = 4 * h
    out_w = 4 * w
    coef_focal, coef_dice, coef_dice_t = _gradient_coefficients(
        grad_focal_ptr, grad_dice_ptr, saved_ptr, focal_stride, dice_stride, instance, 16 * h * w, SMOOTH,
        HAS_FOCAL, HAS_DICE)
    low = low_ptr + instance.to(tl.int64) * h * w
    tgt = target_ptr + instance.to(tl.int64) * (16 * h * w)
    v_ul, v_um, v_ur, v_ml, v_mm, v_mr, v_dl, v_dm, v_dr = _neighbourhood(low, i, j, h, w)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for b in range(8):
        ox = 4 * j - 2 + b  # BLOCK_J full-res columns
        wx = _hat(ox, j, w, out_w)  # BLOCK_J, 0 outside [0, 4w)
        row_up = _row_values(v_ul, v_um, v_ur, ox, j, w)
        row_mid = _row_values(v_ml, v_mm, v_mr, ox, j, w)
        row_down = _row_values(v_dl, v_dm, v_dr, ox, j, w)
        column = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
        for a in range(8):
            oy = 4 * i - 2 + a  # BLOCK_I full-res rows
            wy = _hat(oy, i, h, out_h)  # BLOCK_I, 0 outside [0, 4h)
            valid = ((oy >= 0) & (oy < out_h))[:, None] & ((ox >= 0) & (ox < out_w))[None, :]
            x = _logits(row_up, row_mid, row_down, oy, i, h)  # BLOCK_I x BLOCK_J
            t = tl.load(tgt + oy[:, None] * out_w + ox[None, :], mask=valid, other=0) != 0
            g = _pixel_gradient(x, t, coef_focal, coef_dice, coef_dice_t, ALPHA, FAST_LOG, HAS_FOCAL)
            column += tl.where(valid, wy[:, None] * g, 0.0)  # pixels outside the canvas: none
        acc += wx[None, :] * column
    valid = (i < h)[:, None] & (j < w)[None, :]
    tl.store(grad_ptr + instance.to(tl.int64) * h * w + i[:, None] * w + j[None, :], acc, mask=valid)


# BLOCK_I x BLOCK_J = 16 x 32 low-res pixels a program, 8 warps: 8192 full-res pixels, so a
# 256 x 256 -> 1024 x 1024 instance is 128 programs (200 of them: 25600; a partial costs 24 bytes
# against 8192 x 1.25 bytes read) and a row of 32 float32 low-res logits is one 128-byte read.
# The offset loops are runtime loops: unrolled (tl.static_range) the compiler hoisted the 16 / 64
# pixel evaluations' loads and spilled (sm_90 ptxas, 16 x 64 tiles: 255 registers and 184 bytes
# of spill in the forward, 21 KB of spill stores in the backward). Rolled, ptxas -v for sm_90
# (Triton 3.8) reports: 16 x 32, 8 warps (2 pixels a thread): forward 69 / backward 71 registers,
# no spill; 16 x 64, 8 warps: 127 / 128, the backward spilling 4 bytes; 16 x 64, 4 warps: 221 /
# 247. Not yet timed on a GPU. The interpreter runs one numpy call per block operation, so its
# time goes with the number of programs (a backward program takes about half a second there
# whatever its tile): 64 x 64 tiles, one program per plane of the tiny model's 64 x 64 low-res
# logits, so that training steps under the interpreter (the test suite) stay fast; the kernels'
# own tests set 16 x 16 tiles, under which their planes of 16 are exactly one tile and 17 x 9
# span two.
_BLOCK_I, _BLOCK_J, _NUM_WARPS = 16, 32, 8
_INTERPRET_BLOCK_I, _INTERPRET_BLOCK_J = 64, 64


def _launch_shape() -> tuple[int, int, int]:
    """(BLOCK_I, BLOCK_J, warps) of both kernels."""
    return (_INTERPRET_BLOCK_I, _INTERPRET_BLOCK_J, 4) if INTERPRET else (_BLOCK_I, _BLOCK_J, _NUM_WARPS)


def _flat(low_res: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (N x h x w float32, N x 4h x 4w uint8), contiguous."""
    height, width = low_res.shape[-2:]
    num = low_res.shape[:-2].numel()
    flat_low = low_res.detach().contiguous().reshape(num, height, width)  # N x h x w
    flat_target = target.contiguous().reshape(num, 4 * height, 4 * width).view(torch.uint8)  # N x 4h x 4w
    return flat_low, flat_target


def _grid(num: int, height: int, width: int) -> tuple[int, int, int, int, int]:
    """-> (BLOCK_I, BLOCK_J, warps, tiles per instance, tiles along j)."""
    block_i, block_j, warps = _launch_shape()
    tiles_j = triton.cdiv(width, block_j)
    return block_i, block_j, warps, triton.cdiv(height, block_i) * tiles_j, tiles_j


def upsampled_mask_loss_forward_triton(low_res: torch.Tensor, target: torch.Tensor
                                       ) -> tuple[torch.Tensor, ...]:
    """-> (focal, dice, iou) of the upsampled logits, each `lead` float32 (the leading dims), and
    saved = (I, D) N x 2 float32. Two launches: the partials, `mask_loss.finalize_terms`."""
    flat_low, flat_target = _flat(low_res, target)
    num, height, width = flat_low.shape
    block_i, block_j, warps, tiles, tiles_j = _grid(num, height, width)
    sums, counts = new_partials(num, tiles, low_res.device)
    if num * tiles > 0:
        _upsampled_loss_forward_kernel[(num * tiles,)](
            flat_low, flat_target, sums, counts, height, width, tiles, tiles_j, ALPHA=FOCAL_ALPHA,
            BLOCK_I=block_i, BLOCK_J=block_j, FAST_LOG=FAST_LOG, num_warps=warps)
    return finalize_terms(sums, counts, 16 * height * width, low_res.shape[:-2])


class UpsampledMaskLossFunction(torch.autograd.Function):
    """Fused upsampling + focal / dice / IoU; saves low_res, target and I, D (N x 2 float32)."""

    @staticmethod
    def forward(ctx, low_res, target):
        focal, dice, iou, saved = upsampled_mask_loss_forward_triton(low_res, target)
        ctx.save_for_backward(low_res, target, saved)
        ctx.mark_non_differentiable(iou)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return focal, dice, iou

    @staticmethod
    def backward(ctx, grad_focal, grad_dice, grad_iou):
        refuse_differentiable_backward("upsampled_mask_loss_terms")
        low_res, target, saved = ctx.saved_tensors
        flat_low, flat_target = _flat(low_res, target)
        num, height, width = flat_low.shape
        upstream, flags = coefficient_args(grad_focal, grad_dice, saved)
        grad = torch.empty_like(flat_low)  # N x h x w float32
        block_i, block_j, warps, tiles, tiles_j = _grid(num, height, width)
        if num * tiles > 0:
            _upsampled_loss_backward_kernel[(num * tiles,)](
                flat_low, flat_target, grad, *upstream, height, width, tiles, tiles_j, ALPHA=FOCAL_ALPHA,
                SMOOTH=DICE_SMOOTH, BLOCK_I=block_i, BLOCK_J=block_j, FAST_LOG=FAST_LOG, num_warps=warps,
                **flags)
        return grad.reshape(low_res.shape), None


def upsampled_mask_loss_terms_triton(low_res: torch.Tensor, target: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused Triton version of `upsampled_mask_loss_terms_reference` (same outputs and gradient);
    no full-resolution float tensor is written or saved."""
    check_upsampled_inputs(low_res, target)
    check_triton_sizes(target)
    return UpsampledMaskLossFunction.apply(low_res, target)
