"""Mask decoder head: SAM's last upscaling stage (transposed conv, GELU) and the per-prompt mask dot product.

Specification. upscaled X (N x Cin x H x W), weight W (Cin x Cout x 2 x 2, ConvTranspose2d's
layout), bias b (Cout), hyper_in h (N x Cout) -> masks M (N x 1 x 2H x 2W):

    M[n, 0, 2i + a, 2j + b] = sum_c gelu(sum_k X[n, k, i, j] W[k, c, a, b] + b[c]) h[n, c]

with the exact (erf) GELU, i.e. `(gelu(conv_transpose2d(X, W, b, stride=2)).permute(0, 2, 3, 1)
@ h[:, :, None])` (a stride-2, kernel-2 transposed convolution gives every input pixel its own
2 x 2 output block). Arithmetic in float32 whatever the input dtypes; the masks are float32
(the decoder's caller converts them to float32 for the bilinear upsampling right after, so
returning float32 saves that pass). `mask_head_reference` is the specification in torch.

`mask_head_triton` (a `torch.autograd.Function`) never writes the N x Cout x 2H x 2W activations
(840 MB in bf16 at SAM's N = 200, Cout = 32, 2H = 2W = 256) and saves only its inputs for the
backward (X is the previous layer's output, which autograd keeps for that layer anyway):
- forward: a program takes BLOCK_P input pixels (i, j) of one prompt. In channels-last storage
  (N x H x W x Cin) these are BLOCK_P rows of Cin contiguous values. For each output position
  q = (a, b) it computes pre_q = X_tile @ W_q + b (BLOCK_P x Cout, tl.dot with float32
  accumulation; W_q[k, c] = W[k, c, a, b], the weight reshaped once on the host to
  Cin x (a, b, c)), then gelu(pre_q) @ h[n] -> BLOCK_P values, written to M[n, 0, 2i + a, 2j + b].
- backward (g = dL/dM): a program streams ITERS tiles of BLOCK_P pixels of one prompt and for
  each recomputes pre_q, then
      d_pre_q   = gelu'(pre_q) h[n] g[n, 0, 2i + a, 2j + b]                BLOCK_P x Cout
      dX_tile   = sum_q d_pre_q @ W_q^T                                   BLOCK_P x Cin (written)
      dW_q     += X_tile^T @ d_pre_q,  db += sum_pixels,q d_pre_q           (registers)
      dh[n]    += sum_pixels,q gelu(pre_q) g                              (registers)
  and writes its dW, db and dh as float32 partials, which torch sums (fixed order:
  deterministic, no atomics). gelu'(x) = Phi(x) + x phi(x) (Phi, phi: the standard normal CDF
  and density).

Precision. bf16 / fp16 X with a weight of the same dtype: X_tile @ W_q runs on the raw 16-bit
values (exact products, float32 sums), so the forward matches the float32 reference up to
summation order. In the backward d_pre is rounded to that dtype for the two products with X and
W (as torch's own bf16 autograd does, whose activation gradients are bf16 tensors); everything
else is float32. In fp16 a d_pre above 65504 overflows there (dX and dW become inf or NaN where
the float32 reference stays finite); bf16, the trainer's 16-bit precision, has float32's range. Any other dtype combination is computed in float32 (tf32x3 products on the GPU,
about float32 accuracy). The gradients are returned in their inputs' dtypes; dX in channels-last
strides. The interpreter (TRITON_INTERPRET=1) computes everything in float32 numpy.

Layout. X not in channels-last storage is copied to it once per call (forward and backward):
`X.permute(0, 2, 3, 1).contiguous()`, a no-op view for channels-last X (what SAM's first
upscaling stage produces in this code base). Cin and Cout need not be powers of two: tiles are
padded to powers of two >= 16 (tl.dot's minimum) with masked loads. Empty inputs (N = 0 or
H W = 0) give empty masks and zero gradients.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resam_kernels.launch import UnsupportedByTriton, refuse_differentiable_backward

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MIN_DOT = 16  # tl.dot's smallest tile side
MAX_CHANNELS = 256  # padded Cin / Cout above this would not fit the register tiles
MAX_PROMPT_ELEMENTS = 1 << 30  # 4 H W and H W Cin below this: offsets inside a prompt stay int32


def _no_autocast(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def check_mask_head_inputs(upscaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           hyper_in: torch.Tensor) -> None:
    if upscaled.dim() != 4 or weight.dim() != 4 or tuple(weight.shape[2:]) != (2, 2) \
            or weight.shape[0] != upscaled.shape[1]:
        raise ValueError(f"mask_head needs upscaled N x Cin x H x W and weight Cin x Cout x 2 x 2, "
                         f"got {tuple(upscaled.shape)} and {tuple(weight.shape)}")
    num, c_out = upscaled.shape[0], weight.shape[1]
    if tuple(bias.shape) != (c_out,) or tuple(hyper_in.shape) != (num, c_out):
        raise ValueError(f"mask_head needs bias ({c_out},) and hyper_in ({num}, {c_out}), "
                         f"got {tuple(bias.shape)} and {tuple(hyper_in.shape)}")


def mask_head_reference(upscaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        hyper_in: torch.Tensor) -> torch.Tensor:
    """The specification in torch: N x Cin x H x W, Cin x Cout x 2 x 2, Cout, N x Cout ->
    masks N x 1 x 2H x 2W float32 (differentiable wrt all four inputs)."""
    check_mask_head_inputs(upscaled, weight, bias, hyper_in)
    with _no_autocast(upscaled):
        pixels = F.gelu(F.conv_transpose2d(upscaled.float(), weight.float(), bias.float(),
                                           stride=2))  # N x Cout x 2H x 2W
        num, c_out, height, width = pixels.shape
        pixels = pixels.permute(0, 2, 3, 1).reshape(num, height * width, c_out)  # N x 4HW x Cout
        return (pixels @ hyper_in.float().unsqueeze(2)).reshape(num, 1, height, width)


@triton.jit
def _dot(a, b, acc, LOW_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. LOW_PRECISION: a, b are bf16/fp16 (exact products);
    Triton's interpreter multiplies 16-bit floats wrongly, so there (UPCAST) they go through
    float32, which is exact. Otherwise float32 operands as tf32x3 (about float32 accuracy)."""
    if LOW_PRECISION:
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_and_grad(x):
    """(gelu(x), gelu'(x) = Phi(x) + x phi(x))."""
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    density = tl.exp(-0.5 * x * x) * 0.3989422804014327
    return x * cdf, cdf + x * density


@triton.jit
def _load_tile(x_ptr, n, pixels, num_pixels, c_in, CIN_P: tl.constexpr, X_DTYPE: tl.constexpr):
    """Channels-last rows of prompt n: pixels (BLOCK_P) -> (BLOCK_P x CIN_P tile in X_DTYPE, 0
    outside, the pixels' offsets in the tile's layout, its mask)."""
    channels = tl.arange(0, CIN_P)
    ok = (pixels < num_pixels)[:, None] & (channels < c_in)[None, :]
    offsets = pixels[:, None] * c_in + channels[None, :]  # BLOCK_P x CIN_P, int32
    tile = tl.load(x_ptr + n.to(tl.int64) * num_pixels * c_in + offsets, mask=ok, other=0.0)
    return tile.to(X_DTYPE), offsets, ok


@triton.jit
def _load_weight(w_ptr, q, c_in, c_out, CIN_P: tl.constexpr, COUT_P: tl.constexpr,
                 X_DTYPE: tl.constexpr):
    """W_q: CIN_P x COUT_P (0 outside Cin x Cout) from the host's Cin x 4 x Cout weight."""
    k = tl.arange(0, CIN_P)
    c = tl.arange(0, COUT_P)
    ok = (k < c_in)[:, None] & (c < c_out)[None, :]
    return tl.load(w_ptr + k[:, None] * (4 * c_out) + q * c_out + c[None, :], mask=ok, other=0.0).to(X_DTYPE)


@triton.jit
def _output_offsets(pixels, width, q: tl.constexpr):
    """Offsets in one prompt's 2H x 2W mask of the output position q = (a, b) of input pixels."""
    i = pixels // width
    j = pixels % width
    return (2 * i + q // 2) * (2 * width) + 2 * j + q % 2


@triton.jit
def _mask_head_forward_kernel(x_ptr, w_ptr, bias_ptr, hyper_ptr, out_ptr, num_pixels, width, c_in, c_out,
                              tiles, BLOCK_P: tl.constexpr, CIN_P: tl.constexpr, COUT_P: tl.constexpr,
                              LOW_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # x: N x HW x Cin (channels-last), w: Cin x 4 x Cout, bias: Cout float32, hyper: N x Cout
    # float32, out: N x 2H x 2W float32; program = (prompt n, tile of BLOCK_P pixels)
    program = tl.program_id(0)
    n = program // tiles
    pixels = (program % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)  # BLOCK_P
    in_range = pixels < num_pixels
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty if LOW_PRECISION else tl.float32
    x, _, _ = _load_tile(x_ptr, n, pixels, num_pixels, c_in, CIN_P, X_DTYPE)  # BLOCK_P x CIN_P
    c = tl.arange(0, COUT_P)
    bias = tl.load(bias_ptr + c, mask=c < c_out, other=0.0)  # COUT_P
    hyper = tl.load(hyper_ptr + n.to(tl.int64) * c_out + c, mask=c < c_out, other=0.0)  # COUT_P, 0 padded
    out = out_ptr + n.to(tl.int64) * 4 * num_pixels
    for q in tl.static_range(4):
        w = _load_weight(w_ptr, q, c_in, c_out, CIN_P, COUT_P, X_DTYPE)  # CIN_P x COUT_P
        pre = _dot(x, w, tl.zeros([BLOCK_P, COUT_P], dtype=tl.float32), LOW_PRECISION, UPCAST) + bias[None, :]
        mask = tl.sum(_gelu(pre) * hyper[None, :], axis=1)  # BLOCK_P
        tl.store(out + _output_offsets(pixels, width, q), mask, mask=in_range)


@triton.jit
def _mask_head_backward_kernel(x_ptr, w_ptr, bias_ptr, hyper_ptr, grad_ptr, dx_ptr, dw_part_ptr,
                               dbias_part_ptr, dhyper_part_ptr, num_pixels, width, c_in, c_out, chunks,
                               BLOCK_P: tl.constexpr, ITERS: tl.constexpr, CIN_P: tl.constexpr,
                               COUT_P: tl.constexpr, LOW_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # grad: N x 2H x 2W float32 (dL/dmasks), dx: N x HW x Cin (x's dtype); partials per program
    # (prompt n, chunk of ITERS tiles): dw_part 4 x Cin x Cout, dbias_part Cout, dhyper_part Cout
    # (float32); program = n * chunks + chunk
    program = tl.program_id(0)
    n = program // chunks
    start = (program % chunks) * (BLOCK_P * ITERS)
    X_DTYPE: tl.constexpr = x_ptr.dtype.element_ty if LOW_PRECISION else tl.float32
    c = tl.arange(0, COUT_P)
    bias = tl.load(bias_ptr + c, mask=c < c_out, other=0.0)  # COUT_P
    hyper = tl.load(hyper_ptr + n.to(tl.int64) * c_out + c, mask=c < c_out, other=0.0)  # COUT_P, 0 padded
    w0 = _load_weight(w_ptr, 0, c_in, c_out, CIN_P, COUT_P, X_DTYPE)  # CIN_P x COUT_P each
    w1 = _load_weight(w_ptr, 1, c_in, c_out, CIN_P, COUT_P, X_DTYPE)
    w2 = _load_weight(w_ptr, 2, c_in, c_out, CIN_P, COUT_P, X_DTYPE)
    w3 = _load_weight(w_ptr, 3, c_in, c_out, CIN_P, COUT_P, X_DTYPE)
    dw0 = tl.zeros([CIN_P, COUT_P], dtype=tl.float32)
    dw1 = tl.zeros([CIN_P, COUT_P], dtype=tl.float32)
    dw2 = tl.zeros([CIN_P, COUT_P], dtype=tl.float32)
    dw3 = tl.zeros([CIN_P, COUT_P], dtype=tl.float32)
    dbias = tl.zeros([COUT_P], dtype=tl.float32)
    dhyper = tl.zeros([COUT_P], dtype=tl.float32)
    grad = grad_ptr + n.to(tl.int64) * 4 * num_pixels
    for step in range(ITERS):
        pixels = start + step * BLOCK_P + tl.arange(0, BLOCK_P)  # BLOCK_P
        in_range = pixels < num_pixels
        x, offsets, ok = _load_tile(x_ptr, n, pixels, num_pixels, c_in, CIN_P, X_DTYPE)  # BLOCK_P x CIN_P
        dx = tl.zeros([BLOCK_P, CIN_P], dtype=tl.float32)
        for q in tl.static_range(4):
            if q == 0:
                w = w0
            elif q == 1:
                w = w1
            elif q == 2:
                w = w2
            else:
                w = w3
            pre = _dot(x, w, tl.zeros([BLOCK_P, COUT_P], dtype=tl.float32), LOW_PRECISION, UPCAST) + bias[None, :]
            act, slope = _gelu_and_grad(pre)  # BLOCK_P x COUT_P
            g = tl.load(grad + _output_offsets(pixels, width, q), mask=in_range, other=0.0)  # BLOCK_P, 0 outside
            dhyper += tl.sum(act * g[:, None], axis=0)
            d_pre = slope * hyper[None, :] * g[:, None]  # BLOCK_P x COUT_P, 0 outside
            dbias += tl.sum(d_pre, axis=0)
            d_pre = d_pre.to(X_DTYPE)
            dx = _dot(d_pre, tl.trans(w), dx, LOW_PRECISION, UPCAST)
            if q == 0:
                dw0 = _dot(tl.trans(x), d_pre, dw0, LOW_PRECISION, UPCAST)
            elif q == 1:
                dw1 = _dot(tl.trans(x), d_pre, dw1, LOW_PRECISION, UPCAST)
            elif q == 2:
                dw2 = _dot(tl.trans(x), d_pre, dw2, LOW_PRECISION, UPCAST)
            else:
                dw3 = _dot(tl.trans(x), d_pre, dw3, LOW_PRECISION, UPCAST)
        tl.store(dx_ptr + n.to(tl.int64) * num_pixels * c_in + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)
    k = tl.arange(0, CIN_P)
    w_ok = (k < c_in)[:, None] & (c < c_out)[None, :]
    dw_part = dw_part_ptr + program.to(tl.int64) * 4 * c_in * c_out + k[:, None] * c_out + c[None, :]
    tl.store(dw_part, dw0, mask=w_ok)
    tl.store(dw_part + c_in * c_out, dw1, mask=w_ok)
    tl.store(dw_part + 2 * c_in * c_out, dw2, mask=w_ok)
    tl.store(dw_part + 3 * c_in * c_out, dw3, mask=w_ok)
    tl.store(dbias_part_ptr + program.to(tl.int64) * c_out + c, dbias, mask=c < c_out)
    tl.store(dhyper_part_ptr + program.to(tl.int64) * c_out + c, dhyper, mask=c < c_out)


# GPU launch: forward BLOCK_P pixels a program (N = 200 at 128 x 128: 25600 programs), backward
# ITERS tiles a program (2048 pixels: 1600 programs, partials 1600 x 34 KB float32). sm_90 ptxas
# (triton 3.8, Cin = 64, Cout = 32, compiled without a GPU): bf16 forward 64 registers (8 warps;
# 136 with 4 warps), float32 forward 167, no spill; bf16 backward 254 registers, no spill (8
# warps, 2 stages; 4 warps spill 104 bytes, 16 warps over 1 KB: the four dW accumulators and the
# unrolled erf/exp of the four output positions). The float32 backward (tf32x3: hi and lo copies
# of every operand) spills about 3.9 KB in every tile shape tried; it is correct but not tuned,
# the model trains in bf16. The interpreter runs one numpy call per block operation: small tiles
# and two steps a program, so that the tests reach several tiles, chunks and partial last tiles
# with small images.
_FORWARD_BLOCK_P, _FORWARD_WARPS = 128, 8
_BACKWARD_BLOCK_P, _BACKWARD_ITERS, _BACKWARD_WARPS, _BACKWARD_STAGES = 64, 32, 8, 2
_INTERPRET_BLOCK_P, _INTERPRET_ITERS = 32, 2


def _padded(channels: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(channels))


def check_triton_sizes(upscaled: torch.Tensor, weight: torch.Tensor) -> None:
    _, c_in, height, width = upscaled.shape
    if _padded(c_in) > MAX_CHANNELS or _padded(weight.shape[1]) > MAX_CHANNELS:
        raise UnsupportedByTriton(f"mask_head_triton: at most {MAX_CHANNELS} channels in and out, "
                                  f"got {c_in} and {weight.shape[1]}")
    if 4 * height * width * max(c_in, 1) >= MAX_PROMPT_ELEMENTS:
        raise UnsupportedByTriton(f"mask_head_triton: {height} x {width} x {c_in} is too large for one prompt")


def _operands(upscaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, hyper_in: torch.Tensor):
    """-> (X N x HW x Cin channels-last (a view for channels-last input), W Cin x 4 x Cout,
    bias Cout float32, hyper_in N x Cout float32, low precision: 16-bit products)."""
    low_precision = upscaled.dtype in (torch.bfloat16, torch.float16) and weight.dtype == upscaled.dtype
    num, c_in, height, width = upscaled.shape
    x = upscaled.detach().permute(0, 2, 3, 1).contiguous().reshape(num, height * width, c_in)  # N x HW x Cin
    w = weight.detach().permute(0, 2, 3, 1).reshape(c_in, 4, -1)  # Cin x (a, b) x Cout
    w = (w if low_precision else w.float()).contiguous()
    if not low_precision:
        x = x.float()
    return x, w, bias.detach().float().contiguous(), hyper_in.detach().float().contiguous(), low_precision


def mask_head_forward_triton(upscaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             hyper_in: torch.Tensor) -> torch.Tensor:
    """Forward only (no graph): masks N x 1 x 2H x 2W float32."""
    num, c_in, height, width = upscaled.shape
    c_out = weight.shape[1]
    masks = torch.empty((num, 1, 2 * height, 2 * width), dtype=torch.float32, device=upscaled.device)
    num_pixels = height * width
    if masks.numel() == 0:
        return masks
    x, w, b, h, low_precision = _operands(upscaled, weight, bias, hyper_in)
    block_p = _INTERPRET_BLOCK_P if INTERPRET else _FORWARD_BLOCK_P
    tiles = triton.cdiv(num_pixels, block_p)
    _mask_head_forward_kernel[(num * tiles,)](
        x, w, b, h, masks, num_pixels, width, c_in, c_out, tiles, BLOCK_P=block_p, CIN_P=_padded(c_in),
        COUT_P=_padded(c_out), LOW_PRECISION=low_precision, UPCAST=INTERPRET, num_warps=_FORWARD_WARPS)
    return masks


def mask_head_backward_triton(upscaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                              hyper_in: torch.Tensor, grad_masks: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dL/d(upscaled, weight, bias, hyper_in) from dL/dmasks (N x 1 x 2H x 2W), each in its
    input's dtype; d upscaled in channels-last strides."""
    num, c_in, height, width = upscaled.shape
    c_out = weight.shape[1]
    num_pixels = height * width
    grad_x = torch.empty((num, height, width, c_in), dtype=upscaled.dtype, device=upscaled.device)  # N x H x W x Cin
    if num * num_pixels == 0:
        return (grad_x.permute(0, 3, 1, 2), torch.zeros_like(weight), torch.zeros_like(bias),
                torch.zeros_like(hyper_in))
    x, w, b, h, low_precision = _operands(upscaled, weight, bias, hyper_in)
    grad = grad_masks.detach().float().contiguous()  # N x 1 x 2H x 2W
    block_p, iters = (_INTERPRET_BLOCK_P, _INTERPRET_ITERS) if INTERPRET else (_BACKWARD_BLOCK_P, _BACKWARD_ITERS)
    chunks = triton.cdiv(num_pixels, block_p * iters)
    programs = num * chunks
    # every program writes its partials, so no fill is needed
    dw_part = torch.empty((num, chunks, 4, c_in, c_out), dtype=torch.float32, device=upscaled.device)
    dbias_part = torch.empty((num * chunks, c_out), dtype=torch.float32, device=upscaled.device)
    dhyper_part = torch.empty((num, chunks, c_out), dtype=torch.float32, device=upscaled.device)
    _mask_head_backward_kernel[(programs,)](
        x, w, b, h, grad, grad_x, dw_part, dbias_part, dhyper_part, num_pixels, width, c_in, c_out, chunks,
        BLOCK_P=block_p, ITERS=iters, CIN_P=_padded(c_in), COUT_P=_padded(c_out),
        LOW_PRECISION=low_precision, UPCAST=INTERPRET, num_warps=_BACKWARD_WARPS,
        num_stages=_BACKWARD_STAGES)
    grad_w = dw_part.sum(dim=(0, 1))  # (a, b) x Cin x Cout -> Cin x Cout x 2 x 2
    grad_w = grad_w.reshape(2, 2, c_in, c_out).permute(2, 3, 0, 1).to(weight.dtype)
    grad_bias = dbias_part.sum(dim=0).to(bias.dtype)
    grad_hyper = dhyper_part.sum(dim=1).to(hyper_in.dtype)
    return grad_x.permute(0, 3, 1, 2), grad_w.contiguous(), grad_bias, grad_hyper


class MaskHeadFunction(torch.autograd.Function):
    """Fused transposed conv + GELU + mask dot product; saves only its inputs."""

    @staticmethod
    def forward(ctx, upscaled, weight, bias, hyper_in):
        ctx.save_for_backward(upscaled, weight, bias, hyper_in)
        return mask_head_forward_triton(upscaled, weight, bias, hyper_in)

    @staticmethod
    def backward(ctx, grad_masks):
        refuse_differentiable_backward("mask_head")
        upscaled, weight, bias, hyper_in = ctx.saved_tensors
        return mask_head_backward_triton(upscaled, weight, bias, hyper_in, grad_masks)


def mask_head_triton(upscaled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                     hyper_in: torch.Tensor) -> torch.Tensor:
    """Fused Triton version of `mask_head_reference` (same float32 masks and gradients)."""
    check_mask_head_inputs(upscaled, weight, bias, hyper_in)
    check_triton_sizes(upscaled, weight)
    with _no_autocast(upscaled):
        return MaskHeadFunction.apply(upscaled, weight, bias, hyper_in)
