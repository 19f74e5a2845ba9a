"""Bilinear 4x upsampling of mask logits (SAM's low-res masks to the canvas), forward and backward.

Specification: `upsample4x_reference(low_res)` = F.interpolate(low_res, (4h, 4w), mode="bilinear",
align_corners=False) for float32 N x C x h x w, with its autograd gradient. Per axis, output pixel
o samples the input at s(o) = (o + 0.5) / 4 - 0.5, clamped below at 0 (PyTorch's rule); with
i0 = floor(s), i1 = min(i0 + 1, n - 1) and l = s - i0 the output is (1 - l) x[i0] + l x[i1]
(separable over the two axes). Equivalently, input pixel i gets the weight
    hat(o, i) = max(0, 1 - |min(s(o), n - 1) - i|)
from output pixel o (the upper clamp folds the tap beyond the last pixel back onto it), and the
gradient of input pixel (i, j) is  sum_{o, p} hat(o, i) hat(p, j) g[o, p]  over the 8 x 8 output
pixels o = 4i - 2 ... 4i + 5, p = 4j - 2 ... 4j + 5 (the others have weight 0).

Why kernels: 200 masks of 1024 x 1024 per decode (ViT-B step). PyTorch's CUDA backward scatters
every output gradient into the input with atomic adds (about 2.9 ms a step on an H200); here
- forward: one program per (N C plane, output tile of TILE_Y x TILE_X); one float32 write per output
  pixel, the four taps read from the (4x smaller, cached) input;
- backward: one program per (plane, input tile of BLOCK_I x BLOCK_J); each input pixel gathers its
  8 x 8 output gradients with the hat weights (no atomics: deterministic). One read of the
  output gradient (neighbouring tiles share a 2-pixel halo), one write of the input gradient.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resam_kernels.launch import UnsupportedByTriton, refuse_differentiable_backward

# Read once at import: Triton's interpreter must be switched on before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_PLANE_PIXELS = 1 << 30  # (4h)(4w) below this: offsets inside a plane stay int32


def check_upsample_input(low_res: torch.Tensor) -> None:
    if low_res.dim() != 4 or low_res.dtype != torch.float32:
        raise ValueError(f"upsample4x takes float32 N x C x h x w, got {low_res.dtype} {tuple(low_res.shape)}")


def upsample4x_reference(low_res: torch.Tensor) -> torch.Tensor:
    """float32 N x C x h x w -> N x C x 4h x 4w (bilinear, align_corners=False)."""
    check_upsample_input(low_res)
    return F.interpolate(low_res, (4 * low_res.shape[-2], 4 * low_res.shape[-1]), mode="bilinear",
                         align_corners=False)


@triton.jit
def _source(o, n):
    """Output pixels o (int32) -> (i0, i1, l): the two input taps along an axis of n pixels and
    the weight l of i1 (PyTorch's align_corners=False rule)."""
    s = tl.maximum((o.to(tl.float32) + 0.5) * 0.25 - 0.5, 0.0)
    i0 = s.to(tl.int32)  # floor (s >= 0)
    i1 = tl.minimum(i0 + 1, n - 1)
    return i0, i1, s - i0.to(tl.float32)


@triton.jit
def _upsample_forward_kernel(x_ptr, out_ptr, h, w, tiles, tiles_x, TILE_Y: tl.constexpr, TILE_X: tl.constexpr):
    # x: planes x h x w float32 contiguous, out: planes x 4h x 4w; program = plane * tiles + tile
    # (one grid axis: any number of planes and tiles)
    plane = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    out_w = 4 * w
    oy = (tile // tiles_x) * TILE_Y + tl.arange(0, TILE_Y)  # TILE_Y
    ox = (tile % tiles_x) * TILE_X + tl.arange(0, TILE_X)  # TILE_X
    y0, y1, ly = _source(oy, h)
    x0, x1, lx = _source(ox, w)
    valid = (oy < 4 * h)[:, None] & (ox < out_w)[None, :]  # TILE_Y x TILE_X
    src = x_ptr + plane.to(tl.int64) * h * w
    top = y0[:, None] * w
    bottom = y1[:, None] * w
    v00 = tl.load(src + top + x0[None, :], mask=valid, other=0.0)
    v01 = tl.load(src + top + x1[None, :], mask=valid, other=0.0)
    v10 = tl.load(src + bottom + x0[None, :], mask=valid, other=0.0)
    v11 = tl.load(src + bottom + x1[None, :], mask=valid, other=0.0)
    wx1 = lx[None, :]
    wy1 = ly[:, None]
    value = (1.0 - wy1) * ((1.0 - wx1) * v00 + wx1 * v01) + wy1 * ((1.0 - wx1) * v10 + wx1 * v11)
    dst = out_ptr + plane.to(tl.int64) * (16 * h * w)
    tl.store(dst + oy[:, None] * out_w + ox[None, :], value, mask=valid)


@triton.jit
def _hat(o, i, n, n_out):
    """Weight of output pixels o (column) for input pixels i (row) along an axis of n input
    pixels: max(0, 1 - |min(s(o), n - 1) - i|), 0 outside [0, n_out)."""
    s = tl.minimum(tl.maximum((o.to(tl.float32) + 0.5) * 0.25 - 0.5, 0.0), (n - 1).to(tl.float32))
    weight = tl.maximum(1.0 - tl.abs(s - i.to(tl.float32)), 0.0)
    return tl.where((o >= 0) & (o < n_out), weight, 0.0)


@triton.jit
def _upsample_backward_kernel(g_ptr, grad_ptr, h, w, tiles, tiles_j, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    # g: planes x 4h x 4w float32 contiguous (output gradient), grad: planes x h x w; program =
    # plane * tiles + tile of input pixels
    plane = tl.program_id(0) // tiles
    tile = tl.program_id(0) % tiles
    i = (tile // tiles_j) * BLOCK_I + tl.arange(0, BLOCK_I)  # BLOCK_I input rows
    j = (tile % tiles_j) * BLOCK_J + tl.arange(0, BLOCK_J)  # BLOCK_J input columns
    out_h = 4 * h
    out_w = 4 * w
    src = g_ptr + plane.to(tl.int64) * (16 * h * w)
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
    for a in tl.static_range(8):
        oy = 4 * i - 2 + a  # BLOCK_I
        wy = _hat(oy, i, h, out_h)  # BLOCK_I
        row = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
        for b in tl.static_range(8):
            ox = 4 * j - 2 + b  # BLOCK_J
            wx = _hat(ox, j, w, out_w)  # BLOCK_J
            valid = ((oy >= 0) & (oy < out_h))[:, None] & ((ox >= 0) & (ox < out_w))[None, :]
            g = tl.load(src + oy[:, None] * out_w + ox[None, :], mask=valid, other=0.0)
            row += wx[None, :] * g
        acc += wy[:, None] * row
    valid = (i < h)[:, None] & (j < w)[None, :]
    tl.store(grad_ptr + plane.to(tl.int64) * h * w + i[:, None] * w + j[None, :], acc, mask=valid)


_TILE_Y, _TILE_X, _FORWARD_WARPS = 8, 256, 8  # 2048 output pixels a program
_BLOCK_I, _BLOCK_J, _BACKWARD_WARPS = 16, 64, 4  # 1024 input pixels (16 K output gradients) a program


def upsample4x_forward_triton(low_res: torch.Tensor) -> torch.Tensor:
    check_upsample_input(low_res)
    n, c, h, w = low_res.shape
    if 16 * h * w >= MAX_PLANE_PIXELS:
        raise UnsupportedByTriton(f"upsample4x_triton: planes of {h} x {w} pixels are too large (at most 2^30 "
                                  "outputs a plane)")
    planes = n * c
    x = low_res.detach().contiguous()
    out = torch.empty((n, c, 4 * h, 4 * w), dtype=torch.float32, device=low_res.device)
    tiles_y, tiles_x = triton.cdiv(4 * h, _TILE_Y), triton.cdiv(4 * w, _TILE_X)
    if planes * tiles_y * tiles_x > 0:
        tiles = tiles_y * tiles_x
        _upsample_forward_kernel[(planes * tiles,)](x, out, h, w, tiles, tiles_x, TILE_Y=_TILE_Y, TILE_X=_TILE_X,
                                                   num_warps=_FORWARD_WARPS)
    return out


def upsample4x_backward_triton(grad_out: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n, c = grad_out.shape[:2]
    planes = n * c
    g = grad_out.float().contiguous()
    grad = torch.empty((n, c, h, w), dtype=torch.float32, device=grad_out.device)
    tiles_i, tiles_j = triton.cdiv(h, _BLOCK_I), triton.cdiv(w, _BLOCK_J)
    if planes * tiles_i * tiles_j > 0:
        tiles = tiles_i * tiles_j
        _upsample_backward_kernel[(planes * tiles,)](g, grad, h, w, tiles, tiles_j, BLOCK_I=_BLOCK_I,
                                                    BLOCK_J=_BLOCK_J, num_warps=_BACKWARD_WARPS)
    return grad


class Upsample4xFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, low_res):
        ctx.size = low_res.shape[-2:]
        return upsample4x_forward_triton(low_res)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_differentiable_backward("upsample4x")
        return upsample4x_backward_triton(grad_out, *ctx.size)


def upsample4x_triton(low_res: torch.Tensor) -> torch.Tensor:
    """Triton version of `upsample4x_reference` (same values up to rounding, same gradient up to
    summation order)."""
    check_upsample_input(low_res)
    return Upsample4xFunction.apply(low_res)
