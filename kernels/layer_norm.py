"""LayerNorm over the last dim with a fused residual add, bias add and GELU, forward and backward.

Specification (`layer_norm_reference`), for x ... x C (rows = all leading dims flattened):
    z = x + residual + pre_bias          residual: same shape as x (optional); pre_bias: C (optional)
    y = act(LN(z) weight + bias)         LN over the last dim: (z - mean) / sqrt(var + eps), biased var
    act = exact GELU 0.5 u (1 + erf(u / sqrt 2)) with `gelu`, else identity
all in float32 whatever the input dtypes (weight / bias C, bf16 or fp32, or None for 1 / 0),
y returned in x's dtype. The reference is `F.layer_norm` (and `F.gelu`) on the float32 sum, so
for float32 inputs without pre_bias and gelu it is exactly `nn.LayerNorm(x + residual)`.

Why: the mask decoder runs its LayerNorms over many short rows (ViT-B, 200 prompts: 3.3 M rows
of 64 channels in the upscaling's LayerNorm2d, 0.8 M rows of 256 in the two-way transformer's
norm4), where PyTorch's CUDA kernel and the separate residual add / bias add / GELU passes are
far from the memory bandwidth. `layer_norm_triton` does each in one pass:
- forward: one program normalises a BLOCK_ROWS x C_PAD tile (C_PAD = next power of two of C,
  masked columns beyond C), float32 math; it reads x (and residual, pre_bias), writes y and a
  float32 mean and rstd per row. With a residual (and no pre_bias) it also writes the normalised
  xhat = (z - mean) rstd (in x's dtype, or the residual's if wider), and the backward keeps
  xhat instead of x and the residual: in the two-way transformer (norm4) those are the attention
  output and the previous keys, which no other node keeps while the decoder's weights are frozen
  (LoRA on the encoder), so 2 tensors of 200 x 4096 x 256 are freed for 1 (bf16: 400 MiB each in
  the ViT-B step). xhat, not z: z rounded to bf16 loses the deviations from a
  large row mean, xhat keeps bf16's relative precision. Otherwise it keeps x (and residual,
  pre_bias) and recomputes z and xhat. Either way it recomputes the GELU input.
- backward: a program walks ITERS tiles of rows; per row, with g = dy act'(u) (u the GELU input,
  act' = Phi(u) + u phi(u)), xhat = (z - mean) rstd, wg = g weight:
      dz = rstd (wg - mean_C(wg) - xhat mean_C(wg xhat))     (= d x = d residual)
  and it keeps float32 column sums of g xhat (d weight), g (d bias) and dz (d pre_bias), written
  as one partial row per program; torch sums the partials (fixed order: deterministic, no
  atomics); without any parameter needing a gradient (frozen LayerNorms, as in LoRA training)
  no column sums are kept. d residual is the same tensor as d x when both have the same dtype.

Layout: the kernels read rows of C contiguous values. Inputs are made contiguous first
(`.contiguous()`: no copy when x is contiguous in its own dim order, as the N x H x W x C
permuted view of a channels-last N x C x H x W tensor is; any other layout is copied once).
Limits: 1 <= C <= MAX_C (ValueError above); rows = 0 gives empty outputs and zero parameter
gradients. Offsets are int64 (any number of rows).
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

MAX_C = 4096  # one row's C_PAD float32 values per tile stay in registers up to here


def _no_autocast(tensor: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def check_layer_norm_inputs(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            residual: torch.Tensor | None, pre_bias: torch.Tensor | None) -> int:
    """-> C; ValueError for inconsistent shapes."""
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"layer_norm needs x ... x C with C >= 1, got {tuple(x.shape)}")
    channels = x.shape[-1]
    for name, param in (("weight", weight), ("bias", bias), ("pre_bias", pre_bias)):
        if param is not None and tuple(param.shape) != (channels,):
            raise ValueError(f"layer_norm: {name} must have shape ({channels},), got {tuple(param.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    return channels


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                         eps: float, *, residual: torch.Tensor | None = None,
                         pre_bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """act(LN(x + residual + pre_bias) weight + bias) over the last dim, float32 math, x's dtype."""
    channels = check_layer_norm_inputs(x, weight, bias, residual, pre_bias)
    with _no_autocast(x):
        z = x.float()  # ... x C (x itself when float32)
        if residual is not None:
            z = z + residual.float()
        if pre_bias is not None:
            z = z + pre_bias.float()
        y = F.layer_norm(z, (channels,), None if weight is None else weight.float(),
                         None if bias is None else bias.float(), eps)
        if gelu:
            y = F.gelu(y)
        return y.to(x.dtype)


@triton.jit
def _tile(row_block, rows, C, BLOCK_ROWS: tl.constexpr, C_PAD: tl.constexpr):
    """Row block -> (offset of its first value (int64 scalar), its first row (int64), row in
    range, offsets BLOCK_ROWS x C_PAD from the first value (int32: BLOCK_ROWS C < 2^31), mask)."""
    first_row = row_block.to(tl.int64) * BLOCK_ROWS
    local_row = tl.arange(0, BLOCK_ROWS)  # BLOCK_ROWS
    col = tl.arange(0, C_PAD)  # C_PAD
    row_ok = local_row < rows - first_row
    offsets = local_row[:, None] * C + col[None, :]
    return first_row * C, first_row, row_ok, offsets, row_ok[:, None] & (col < C)[None, :]


@triton.jit
def _load_z(x_ptr, res_ptr, pre_ptr, base, offsets, mask, col, col_ok, HAS_RES: tl.constexpr,
            HAS_PRE: tl.constexpr):
    """z = (x + residual) + pre_bias in float32, 0 outside the mask."""
    z = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        z += tl.load(res_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_PRE:
        pre = tl.load(pre_ptr + col, mask=col_ok, other=0.0).to(tl.float32)  # C_PAD
        z = tl.where(mask, z + pre[None, :], 0.0)
    return z


@triton.jit
def _layer_norm_forward_kernel(x_ptr, res_ptr, pre_ptr, w_ptr, b_ptr, y_ptr, xhat_ptr, mean_ptr, rstd_ptr,
                               rows, C, eps, HAS_RES: tl.constexpr, HAS_PRE: tl.constexpr,
                               GELU: tl.constexpr, STORE_XHAT: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               C_PAD: tl.constexpr):
    # x, residual, y, xhat (written with STORE_XHAT, in its dtype): rows x C contiguous; pre_bias,
    # weight, bias: C; mean, rstd: rows float32.
    base, first_row, row_ok, offsets, mask = _tile(tl.program_id(0), rows, C, BLOCK_ROWS, C_PAD)
    col = tl.arange(0, C_PAD)
    col_ok = col < C
    z = _load_z(x_ptr, res_ptr, pre_ptr, base, offsets, mask, col, col_ok, HAS_RES, HAS_PRE)
    mean = tl.sum(z, axis=1) / C  # BLOCK_ROWS
    diff = tl.where(mask, z - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(diff * diff, axis=1) / C + eps)  # BLOCK_ROWS
    if STORE_XHAT:
        tl.store(xhat_ptr + base + offsets, (diff * rstd[:, None]).to(xhat_ptr.dtype.element_ty), mask=mask)
    weight = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)  # C_PAD
    bias = tl.load(b_ptr + col, mask=col_ok, other=0.0).to(tl.float32)  # C_PAD
    u = diff * rstd[:, None] * weight[None, :] + bias[None, :]
    if GELU:
        u = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))  # 1 / sqrt 2
    tl.store(y_ptr + base + offsets, u.to(y_ptr.dtype.element_ty), mask=mask)
    local_row = tl.arange(0, BLOCK_ROWS)
    tl.store(mean_ptr + first_row + local_row, mean, mask=row_ok)
    tl.store(rstd_ptr + first_row + local_row, rstd, mask=row_ok)


@triton.jit
def _layer_norm_backward_kernel(x_ptr, res_ptr, pre_ptr, w_ptr, b_ptr, dy_ptr, mean_ptr, rstd_ptr,
                                dx_ptr, dres_ptr, partial_ptr, rows, C, HAS_RES: tl.constexpr,
                                HAS_PRE: tl.constexpr, GELU: tl.constexpr, FROM_XHAT: tl.constexpr,
                                SEPARATE_DRES: tl.constexpr,
                                ACCUMULATE: tl.constexpr, BLOCK_ROWS: tl.constexpr, C_PAD: tl.constexpr,
                                ITERS: tl.constexpr):
    # dy, dx (x's dtype), dres (residual's dtype, written only when SEPARATE_DRES): rows x C;
    # partial (only with ACCUMULATE: some parameter needs its gradient): programs x 3 x C float32
    # (column sums of g xhat, g, dz over this program's rows).
    program = tl.program_id(0)
    col = tl.arange(0, C_PAD)
    col_ok = col < C
    weight = tl.load(w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)  # C_PAD
    bias = tl.load(b_ptr + col, mask=col_ok, other=0.0).to(tl.float32)  # C_PAD
    # column sums kept per tile row and reduced over the rows once at the end: a reduction across
    # the warps every step (8 rows of 256 channels at C = 256) made the backward with parameter
    # gradients 9x slower than without (3.70 against 0.40 ms, H200 run 9)
    acc_dw = tl.zeros([BLOCK_ROWS, C_PAD], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_ROWS, C_PAD], dtype=tl.float32)
    acc_dz = tl.zeros([BLOCK_ROWS, C_PAD], dtype=tl.float32)
    for step in range(ITERS):
        base, first_row, row_ok, offsets, mask = _tile(program * ITERS + step, rows, C, BLOCK_ROWS, C_PAD)
        local_row = tl.arange(0, BLOCK_ROWS)
        rstd = tl.load(rstd_ptr + first_row + local_row, mask=row_ok, other=0.0)  # BLOCK_ROWS
        if FROM_XHAT:  # x_ptr holds the forward's xhat
            xhat = tl.load(x_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)
        else:
            z = _load_z(x_ptr, res_ptr, pre_ptr, base, offsets, mask, col, col_ok, HAS_RES, HAS_PRE)
            mean = tl.load(mean_ptr + first_row + local_row, mask=row_ok, other=0.0)  # BLOCK_ROWS
            xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        g = tl.load(dy_ptr + base + offsets, mask=mask, other=0.0).to(tl.float32)  # 0 outside the mask
        if GELU:
            u = xhat * weight[None, :] + bias[None, :]
            cdf = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
            pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327  # 1 / sqrt(2 pi)
            g = g * (cdf + u * pdf)
        if ACCUMULATE:
            acc_dw += g * xhat  # 0 outside the mask (g is)
            acc_db += g
        wg = g * weight[None, :]
        mean_wg_xhat = tl.sum(wg * xhat, axis=1) / C  # BLOCK_ROWS
        mean_wg = tl.sum(wg, axis=1) / C  # BLOCK_ROWS
        dz = (wg - mean_wg[:, None] - xhat * mean_wg_xhat[:, None]) * rstd[:, None]  # 0 outside rows
        tl.store(dx_ptr + base + offsets, dz.to(dx_ptr.dtype.element_ty), mask=mask)
        if SEPARATE_DRES:
            tl.store(dres_ptr + base + offsets, dz.to(dres_ptr.dtype.element_ty), mask=mask)
        if ACCUMULATE and HAS_PRE:
            acc_dz += tl.where(mask, dz, 0.0)
    if ACCUMULATE:
        out = partial_ptr + program.to(tl.int64) * 3 * C + col
        tl.store(out, tl.sum(acc_dw, axis=0), mask=col_ok)
        tl.store(out + C, tl.sum(acc_db, axis=0), mask=col_ok)
        if HAS_PRE:
            tl.store(out + 2 * C, tl.sum(acc_dz, axis=0), mask=col_ok)


# Launch shapes. A tile is BLOCK_ROWS x C_PAD with BLOCK_ROWS = max(1, TILE / C_PAD) (capped):
# forward 8192 values (C = 64: 128 rows, 16 KB of bf16 read and 16 KB written a program; C = 256:
# 32 rows), backward 2048 values a step and ITERS = 16 steps a program (C = 64: 512 rows a
# program, 3.3 M rows -> 6.5 k programs whose 3 x C float32 partials are 5 MB against ~1.3 GB
# of rows; C = 256: 128 rows, 19 MB against 1.6 GB). 8 warps: 32 (forward) / 8 (backward, per
# step) values per thread and tensor. sm_90 compile (ptxas -v, Triton 3.8, bf16):
# forward 64-103 registers (2+ programs per SM; 161 at C = 256 when it also writes xhat: 1 per
# SM, not yet timed); backward (column sums per tile row, reduced at
# the end) 76-181 for C = 64 ... 1024 without spills, except C = 1024 with pre_bias, GELU and
# column sums (16 bytes); a 4096-value backward step needed more registers for the same bytes in
# flight.
# The interpreter runs one numpy call per block operation: the same tiles, 2 steps a program
# (so the tests cover the loop, partial and empty steps).
_FWD_TILE, _BWD_TILE, _MAX_BLOCK_ROWS, _NUM_WARPS = 8192, 2048, 256, 8
_ITERS, _INTERPRET_ITERS = 16, 2


def _block_rows(tile: int, c_pad: int) -> int:
    return max(1, min(_MAX_BLOCK_ROWS, tile // c_pad))


def _rows_view(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    """... x C -> rows x C contiguous (no copy when already contiguous)."""
    return tensor.contiguous().view(-1, channels)


def _param(param: torch.Tensor | None, channels: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    if param is None:
        return torch.full((channels,), fill, dtype=torch.float32, device=like.device)
    return param.detach().contiguous()


class LayerNormFunction(torch.autograd.Function):
    """Fused residual / bias / LayerNorm / GELU; saves weight, bias, mean, rstd and either xhat
    (with a residual and no pre_bias: one rows x C tensor in x's dtype instead of two) or x,
    residual and pre_bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, pre_bias, eps, gelu):
        channels = x.shape[-1]
        x2 = _rows_view(x.detach(), channels)  # rows x C
        res2 = None if residual is None else _rows_view(residual.detach(), channels)  # rows x C
        pre = None if pre_bias is None else pre_bias.detach().contiguous()  # C
        w, b = _param(weight, channels, 1.0, x), _param(bias, channels, 0.0, x)  # C each
        rows = x2.shape[0]
        y = torch.empty_like(x2)  # rows x C, x's dtype
        store_xhat = res2 is not None and pre is None
        # rows x C in the wider of x's and the residual's dtypes (a float32 residual's gradient
        # stays float32-accurate under bf16 activations)
        xhat = torch.empty_like(x2, dtype=torch.promote_types(x2.dtype, res2.dtype)) if store_xhat else None
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        c_pad = triton.next_power_of_2(channels)
        block_rows = _block_rows(_FWD_TILE, c_pad)
        if rows > 0:
            _layer_norm_forward_kernel[(triton.cdiv(rows, block_rows),)](
                x2, x2 if res2 is None else res2, w if pre is None else pre, w, b, y, y if xhat is None else xhat,
                mean, rstd, rows, channels, eps, HAS_RES=res2 is not None, HAS_PRE=pre is not None, GELU=gelu,
                STORE_XHAT=store_xhat, BLOCK_ROWS=block_rows, C_PAD=c_pad, num_warps=_NUM_WARPS)
        # with xhat saved, x and the residual can be freed (in the decoder no other node keeps the
        # attention output or the previous keys)
        ctx.save_for_backward(xhat if store_xhat else x2, None if store_xhat else res2, pre, w, b, mean, rstd)
        ctx.from_xhat = store_xhat
        ctx.gelu = gelu
        ctx.shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.residual_dtype = None if residual is None else residual.dtype
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        refuse_differentiable_backward("layer_norm")
        x2, res2, pre, w, b, mean, rstd = ctx.saved_tensors  # x2: xhat when ctx.from_xhat (res2 None)
        rows, channels = x2.shape
        dy = _rows_view(grad_y, channels)  # rows x C
        dx = torch.empty(x2.shape, dtype=ctx.x_dtype, device=x2.device)  # rows x C, x's dtype
        has_residual = ctx.residual_dtype is not None
        separate = has_residual and ctx.residual_dtype != ctx.x_dtype
        dres = torch.empty_like(x2, dtype=ctx.residual_dtype) if separate else dx
        c_pad = triton.next_power_of_2(channels)
        block_rows = _block_rows(_BWD_TILE, c_pad)
        iters = _INTERPRET_ITERS if INTERPRET else _ITERS
        programs = triton.cdiv(rows, block_rows * iters)
        weight_dtype, bias_dtype = ctx.param_dtypes
        want_w = weight_dtype is not None and ctx.needs_input_grad[1]
        want_b = bias_dtype is not None and ctx.needs_input_grad[2]
        want_pre = pre is not None and ctx.needs_input_grad[4]
        accumulate = want_w or want_b or want_pre  # frozen LayerNorms (LoRA training): dx only
        # every program writes its partial rows (the d pre_bias row only with pre_bias)
        partial = torch.empty((programs if accumulate else 0, 3, channels), dtype=torch.float32,
                              device=x2.device)
        if rows > 0:
            _layer_norm_backward_kernel[(programs,)](
                x2, x2 if res2 is None else res2, w if pre is None else pre, w, b, dy, mean, rstd,
                dx, dres, partial, rows, channels, HAS_RES=res2 is not None, HAS_PRE=pre is not None,
                GELU=ctx.gelu, FROM_XHAT=ctx.from_xhat, SEPARATE_DRES=separate, ACCUMULATE=accumulate,
                BLOCK_ROWS=block_rows, C_PAD=c_pad, ITERS=iters, num_warps=_NUM_WARPS)
        sums = partial.sum(dim=0)  # 3 x C (zeros for rows = 0 or without accumulation)
        grad_w = sums[0].to(weight_dtype) if want_w else None
        grad_b = sums[1].to(bias_dtype) if want_b else None
        grad_x = dx.view(ctx.shape)
        # without a separate buffer the residual's gradient is x's: the same tensor object (as torch's
        # add backward returns), which autograd copies before accumulating it in two .grad fields;
        # two views of one buffer would become two .grad fields sharing storage
        grad_res = None
        if has_residual and ctx.needs_input_grad[3]:
            grad_res = dres.view(ctx.shape) if separate else grad_x
        grad_pre = sums[2].to(pre.dtype) if want_pre else None
        return grad_x, grad_w, grad_b, grad_res, grad_pre, None, None


def check_triton_sizes(channels: int) -> None:
    if channels > MAX_C:
        raise UnsupportedByTriton(f"layer_norm_triton: C = {channels} channels; at most {MAX_C} "
                                  f"(use layer_norm_reference / use_triton=False)")


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                      *, residual: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                      gelu: bool = False) -> torch.Tensor:
    """Fused Triton version of `layer_norm_reference` (same outputs and gradients)."""
    check_triton_sizes(check_layer_norm_inputs(x, weight, bias, residual, pre_bias))
    return LayerNormFunction.apply(x, weight, bias, residual, pre_bias, float(eps), bool(gelu))
