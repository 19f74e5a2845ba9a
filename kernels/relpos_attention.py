"""Flash attention with SAM's decomposed relative-position bias (the image encoder's attention).

Specification (`relpos_attention_reference`). q, k, v: B x heads x N x d, the N = H x W tokens of
a grid in row-major order (token j sits in row(j) = j // W, column col(j) = j % W, with
W = grid_w); rel_h: B x heads x N x H and rel_w: B x heads x N x W, the per-query tables SAM's
`add_decomposed_rel_pos` computes (rel_h[b, n, i, r] = q_i . Rh[row(i) - r] and
rel_w[b, n, i, c] = q_i . Rw[col(i) - c]; see `resam_dist.model.attention`). Then

    S[i, j] = scale q_i . k_j + rel_h[i, row(j)] + rel_w[i, col(j)]
    out     = softmax_j(S) v

in float32 arithmetic, returned in q's dtype. Gradients reach q, k, v, rel_h and rel_w; with
dS = dL/dS, the relative tables get the sums of dS over the keys of each key row / column:
d rel_h[i, r] = sum_{row(j) = r} dS[i, j] and d rel_w[i, c] = sum_{col(j) = c} dS[i, j].

`relpos_attention_triton` computes the same without materialising the N x N matrices
(`torch.autograd.Function`, three kernels):
- Key blocks are whole grid rows: with WP = next power of two >= W and R = BLOCK_N / WP rows per
  key block, lane t of a key block is the key in row kb R + t // WP, column t % WP (lanes with
  column >= W or row >= H are masked). Then the bias of a (query block, key block) tile is
  rel_h[i, kb R + t // WP] + rel_w[i, t % WP]: a BLOCK_M x WP tile of rel_w, the same for every
  key block (loaded once per query block), plus BLOCK_M x R values of rel_h broadcast over the
  columns. With W in (32, 64] (ViT global attention: 64 x 64 grid) a key block is one row and
  the rel_h term is one column per query; with 14 x 14 windows (WP 16, R 4) a 64-lane key block
  holds 4 rows (56 keys), and a 196-token window is 4 key blocks as with plain 64-token blocks.
- forward: grid = query blocks x (B heads). Online softmax in base 2 over the key blocks
  (BLOCK_M x BLOCK_N logits, `tl.dot` with float32 accumulation); writes out and the row
  logsumexp (base 2, B x heads x N float32), both saved for the backward.
- backward, query-block-major kernel: delta = rowsum(dO * O) (written for the next kernel),
  P recomputed from the logsumexp, dP = dO v^T, dS = P (dP - delta); dq = scale dS k summed over
  key blocks; d rel_w accumulated as a BLOCK_M x WP tile (dS summed over the R rows of each key
  block), d rel_h written per key block (dS summed over the columns of each of its R rows: every
  (query, row) pair belongs to exactly one key block, so no accumulation in memory).
- backward, key-block-major kernel: recomputes P and dS per query block; dv = P^T dO,
  dk = scale dS^T q. No atomics: deterministic.

Supported by the Triton path: q, k, v of one dtype (float32, bfloat16, float16) with unit stride
along d (other strides are passed to the kernels: the q, k, v views of SAM's qkv projection need
no copy), 1 <= d <= 128, 1 <= W <= 64, any H (N times the row stride of q, k and v below 2^31:
token offsets are int32), heads <= 65535 (any B: the
kernels are launched for slices of at most 65535 B x heads, grid axis 1); other inputs raise
ValueError. rel_h / rel_w may have any float dtype (read as float32, gradients
returned in their dtype). float32 inputs use IEEE float32 dot products (not TF32).
16-bit inputs round P and dS to their dtype for the dot products, as flash attention does: in
float16, dS above 65504 (large upstream gradients, e.g. under a loss scale) overflows and dq / dk
become inf or NaN where the float32 reference stays finite. bfloat16 (the trainer's 16-bit
precision; it refuses fp16) has float32's range.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from resam_kernels.launch import UnsupportedByTriton, refuse_differentiable_backward

# Read once at import: Triton's interpreter must be switched on before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MAX_GRID_W = 64  # key blocks hold whole rows: next_power_of_2(W) <= BLOCK_N
MAX_HEAD_DIM = 128
MAX_BATCH_HEADS = 65535  # grid axis 1: B x heads per launch (larger B: several launches)
LOG2E = 1.4426950408889634


def relpos_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                               rel_w: torch.Tensor, grid_w: int, scale: float) -> torch.Tensor:
    """The specification: softmax(scale q k^T + rel_h[i, row(j)] + rel_w[i, col(j)]) v in float32
    (materialises B x heads x N x N), returned in q's dtype."""
    _check_shapes(q, k, v, rel_h, rel_w, grid_w)
    tokens = q.shape[-2]
    key_rows = torch.arange(tokens, device=q.device) // grid_w  # N
    key_cols = torch.arange(tokens, device=q.device) % grid_w  # N
    logits = scale * (q.float() @ k.float().transpose(-1, -2))  # B x heads x N x N
    logits = logits + rel_h.float()[..., key_rows] + rel_w.float()[..., key_cols]  # gathers: B x heads x N x N
    return (torch.softmax(logits, dim=-1) @ v.float()).to(q.dtype)  # B x heads x N x d


def _check_shapes(q, k, v, rel_h, rel_w, grid_w) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"relpos_attention needs q, k, v of one shape B x heads x N x d, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    tokens = q.shape[-2]
    if grid_w < 1 or rel_w.shape != q.shape[:-1] + (grid_w,) or rel_h.shape[:-1] != q.shape[:-1] \
            or rel_h.shape[-1] * grid_w != tokens:
        raise ValueError(f"relpos_attention needs rel_h B x heads x N x H and rel_w B x heads x N x W with "
                         f"N = H W (W = grid_w = {grid_w}), got q {tuple(q.shape)}, rel_h {tuple(rel_h.shape)}, "
                         f"rel_w {tuple(rel_w.shape)}")


def _check_triton_inputs(q, k, v, rel_h, rel_w, grid_w) -> None:
    """Shapes (ValueError), then what the kernels take (UnsupportedByTriton)."""
    _check_shapes(q, k, v, rel_h, rel_w, grid_w)  # (ValueError: the reference refuses them too)
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedByTriton(f"relpos_attention_triton needs q, k, v of one dtype among float32, bfloat16, "
                                  f"float16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (rel_h.is_floating_point() and rel_w.is_floating_point()):
        raise UnsupportedByTriton("relpos_attention_triton needs floating-point rel_h and rel_w")
    batch, heads, tokens, head_dim = q.shape
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise UnsupportedByTriton(f"relpos_attention_triton supports head dims 1 .. {MAX_HEAD_DIM}, got {head_dim}")
    if grid_w > MAX_GRID_W:
        raise UnsupportedByTriton(f"relpos_attention_triton supports grid widths up to {MAX_GRID_W}, got {grid_w}")
    if heads > MAX_BATCH_HEADS:
        raise UnsupportedByTriton(f"relpos_attention_triton supports up to {MAX_BATCH_HEADS} heads, got {heads}")
    row_stride = max(q.stride(2), k.stride(2), v.stride(2), head_dim, grid_w, rel_h.shape[-1])
    if tokens * row_stride >= 2 ** 31:  # token offsets inside one (batch, head) are int32 in the kernels
        raise UnsupportedByTriton(f"relpos_attention_triton: {tokens} tokens with row stride {row_stride} "
                                  "overflow int32 offsets")


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation. Triton's interpreter multiplies 16-bit operands as raw
    integers, so there (UPCAST) they go through float32, which is exact."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _head_offset(bh, heads, stride_b, stride_h):
    """Offset (int64) of (batch bh // heads, head bh % heads) in a tensor of those strides."""
    return (bh // heads).to(tl.int64) * stride_b + (bh % heads).to(tl.int64) * stride_h


@triton.jit
def _logits(q, k, rel_h_tile, rel_w_tile, valid, scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            R: tl.constexpr, WP: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Logits in base 2 (S log2(e)) of a BLOCK_M x BLOCK_N tile, -inf at masked keys; the rel
    tiles are already multiplied by log2(e)."""
    s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale_log2  # BLOCK_M x BLOCK_N
    s += _tile_bias(rel_h_tile, rel_w_tile, BLOCK_M, BLOCK_N, R, WP)
    return tl.where(valid[None, :], s, float("-inf"))


@triton.jit
def _key_block(kb, H, W, WP: tl.constexpr, R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key block kb (rows kb R .. kb R + R - 1) -> (token index, valid), BLOCK_N each."""
    lane = tl.arange(0, BLOCK_N)
    row = kb * R + lane // WP
    col = lane % WP
    return row * W + col, (row < H) & (col < W)


@triton.jit
def _load_rel_w(relw_ptr, offs_m, mask_m, W, WP: tl.constexpr):
    """rel_w[i, c] of the block's queries, columns c < WP (0 beyond W) -> BLOCK_M x WP float32."""
    cols = tl.arange(0, WP)
    return tl.load(relw_ptr + offs_m[:, None] * W + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < W),
                   other=0.0).to(tl.float32)


@triton.jit
def _load_rel_h(relh_ptr, offs_m, mask_m, kb, H, R: tl.constexpr):
    """rel_h[i, kb R + r] for r < R (0 beyond H) -> BLOCK_M x R float32."""
    rows = kb * R + tl.arange(0, R)
    return tl.load(relh_ptr + offs_m[:, None] * H + rows[None, :], mask=mask_m[:, None] & (rows[None, :] < H),
                   other=0.0).to(tl.float32)


@triton.jit
def _tile_bias(rel_h_tile, rel_w_tile, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R: tl.constexpr,
               WP: tl.constexpr):
    """BLOCK_M x R and BLOCK_M x WP -> the bias of the key block, BLOCK_M x BLOCK_N (lane t: rel_h
    column t // WP plus rel_w column t % WP)."""
    if R == 1:
        return rel_h_tile + rel_w_tile
    return tl.reshape(rel_h_tile[:, :, None] + rel_w_tile[:, None, :], (BLOCK_M, BLOCK_N))


@triton.jit
def _row_and_column_sums(ds, BLOCK_M: tl.constexpr, R: tl.constexpr, WP: tl.constexpr):
    """dS of a key block, BLOCK_M x BLOCK_N -> (sums over each of its R rows: BLOCK_M x R, sums
    over its R rows per column: BLOCK_M x WP)."""
    if R == 1:
        return tl.sum(ds, axis=1)[:, None], ds
    ds3 = tl.reshape(ds, (BLOCK_M, R, WP))
    return tl.sum(ds3, axis=2), tl.sum(ds3, axis=1)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, relh_ptr, relw_ptr, o_ptr, lse_ptr,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                    heads, N, H, W, D, scale_log2,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WP: tl.constexpr,
                    R: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # q, k, v: B x heads x N x D (strides given, unit along D); relh: BH x N x H, relw: BH x N x W
    # (contiguous); o: BH x N x D contiguous (q's dtype); lse: BH x N float32 (base 2).
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    q_ptr += _head_offset(bh, heads, sq_b, sq_h)
    k_ptr += _head_offset(bh, heads, sk_b, sk_h)
    v_ptr += _head_offset(bh, heads, sv_b, sv_h)
    relh_ptr += bh64 * N * H
    relw_ptr += bh64 * N * W
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # BLOCK_M query tokens
    mask_m = offs_m < N
    offs_d = tl.arange(0, HEAD_DIM)
    mask_d = offs_d < D
    q = tl.load(q_ptr + offs_m[:, None] * sq_n + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :],
                other=0.0)  # BLOCK_M x HEAD_DIM
    rel_w_tile = _load_rel_w(relw_ptr, offs_m, mask_m, W, WP) * 1.4426950408889634  # BLOCK_M x WP (base 2)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, R)):
        keys, valid = _key_block(kb, H, W, WP, R, BLOCK_N)  # BLOCK_N each
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + keys[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)  # BLOCK_N x HEAD_DIM
        v = tl.load(v_ptr + keys[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)  # BLOCK_N x HEAD_DIM
        rel_h_tile = _load_rel_h(relh_ptr, offs_m, mask_m, kb, H, R) * 1.4426950408889634  # BLOCK_M x R
        s = _logits(q, k, rel_h_tile, rel_w_tile, valid, scale_log2, BLOCK_M, BLOCK_N, R, WP, PRECISION,
                    UPCAST)  # BLOCK_M x BLOCK_N, base 2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # -inf while every key so far has a bias of -inf (the tables used as a mask): shift by 0
        # then, so that exp2 gives 0 instead of exp2(-inf - -inf) = NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptr += bh64 * N * D
    tl.store(o_ptr + offs_m[:, None] * D + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(lse_ptr + bh64 * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _backward_query_kernel(q_ptr, k_ptr, v_ptr, relh_ptr, relw_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr,
                           dq_ptr, drelh_ptr, drelw_ptr,
                           sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
                           heads, N, H, W, D, scale, scale_log2,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           WP: tl.constexpr, R: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr):
    # Query-block-major: writes delta (BH x N float32), dq (BH x N x D), d rel_h (BH x N x H) and
    # d rel_w (BH x N x W), all contiguous.
    mb = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    q_ptr += _head_offset(bh, heads, sq_b, sq_h)
    k_ptr += _head_offset(bh, heads, sk_b, sk_h)
    v_ptr += _head_offset(bh, heads, sv_b, sv_h)
    do_ptr += _head_offset(bh, heads, sdo_b, sdo_h)
    relh_ptr += bh64 * N * H
    relw_ptr += bh64 * N * W
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    offs_d = tl.arange(0, HEAD_DIM)
    mask_d = offs_d < D
    qd_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + offs_m[:, None] * sq_n + offs_d[None, :], mask=qd_mask, other=0.0)  # BLOCK_M x HEAD_DIM
    do = tl.load(do_ptr + offs_m[:, None] * sdo_n + offs_d[None, :], mask=qd_mask, other=0.0)
    o = tl.load(o_ptr + bh64 * N * D + offs_m[:, None] * D + offs_d[None, :], mask=qd_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # BLOCK_M
    tl.store(delta_ptr + bh64 * N + offs_m, delta, mask=mask_m)
    lse = tl.load(lse_ptr + bh64 * N + offs_m, mask=mask_m, other=0.0)  # BLOCK_M, base 2
    rel_w_tile = _load_rel_w(relw_ptr, offs_m, mask_m, W, WP) * 1.4426950408889634  # BLOCK_M x WP
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    d_rel_w = tl.zeros([BLOCK_M, WP], dtype=tl.float32)
    drelh_ptr += bh64 * N * H
    for kb in range(0, tl.cdiv(H, R)):
        keys, valid = _key_block(kb, H, W, WP, R, BLOCK_N)
        kv_mask = valid[:, None] & mask_d[None, :]
        k = tl.load(k_ptr + keys[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)  # BLOCK_N x HEAD_DIM
        v = tl.load(v_ptr + keys[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
        rel_h_tile = _load_rel_h(relh_ptr, offs_m, mask_m, kb, H, R) * 1.4426950408889634  # BLOCK_M x R
        s = _logits(q, k, rel_h_tile, rel_w_tile, valid, scale_log2, BLOCK_M, BLOCK_N, R, WP, PRECISION,
                    UPCAST)  # BLOCK_M x BLOCK_N, base 2
        p = tl.exp2(s - lse[:, None])  # softmax probabilities, 0 at masked keys
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)  # BLOCK_M x BLOCK_N
        ds = p * (dp - delta[:, None])  # dL/dS (natural units)
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)
        row_sums, col_sums = _row_and_column_sums(ds, BLOCK_M, R, WP)  # BLOCK_M x R, BLOCK_M x WP
        d_rel_w += col_sums
        rows = kb * R + tl.arange(0, R)
        tl.store(drelh_ptr + offs_m[:, None] * H + rows[None, :], row_sums.to(drelh_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & (rows[None, :] < H))
    dq_ptr += bh64 * N * D
    tl.store(dq_ptr + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=qd_mask)
    cols = tl.arange(0, WP)
    tl.store(drelw_ptr + bh64 * N * W + offs_m[:, None] * W + cols[None, :], d_rel_w.to(drelw_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (cols[None, :] < W))


@triton.jit
def _backward_key_kernel(q_ptr, k_ptr, v_ptr, relh_ptr, relw_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                         sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n,
                         heads, N, H, W, D, scale, scale_log2,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         WP: tl.constexpr, R: tl.constexpr, PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr):
    # Key-block-major: dk, dv (BH x N x D contiguous) of one key block (R grid rows).
    kb = tl.program_id(0)
    bh = tl.program_id(1)
    bh64 = bh.to(tl.int64)
    q_ptr += _head_offset(bh, heads, sq_b, sq_h)
    k_ptr += _head_offset(bh, heads, sk_b, sk_h)
    v_ptr += _head_offset(bh, heads, sv_b, sv_h)
    do_ptr += _head_offset(bh, heads, sdo_b, sdo_h)
    relh_ptr += bh64 * N * H
    relw_ptr += bh64 * N * W
    lse_ptr += bh64 * N
    delta_ptr += bh64 * N
    offs_d = tl.arange(0, HEAD_DIM)
    mask_d = offs_d < D
    keys, valid = _key_block(kb, H, W, WP, R, BLOCK_N)
    kv_mask = valid[:, None] & mask_d[None, :]
    k = tl.load(k_ptr + keys[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)  # BLOCK_N x HEAD_DIM
    v = tl.load(v_ptr + keys[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for mb in range(0, tl.cdiv(N, BLOCK_M)):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        qd_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + offs_m[:, None] * sq_n + offs_d[None, :], mask=qd_mask, other=0.0)  # BLOCK_M x HEAD_DIM
        do = tl.load(do_ptr + offs_m[:, None] * sdo_n + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=float("inf"))  # p = 0 on padding queries
        delta = tl.load(delta_ptr + offs_m, mask=mask_m, other=0.0)
        rel_h_tile = _load_rel_h(relh_ptr, offs_m, mask_m, kb, H, R) * 1.4426950408889634  # BLOCK_M x R
        rel_w_tile = _load_rel_w(relw_ptr, offs_m, mask_m, W, WP) * 1.4426950408889634  # BLOCK_M x WP
        s = _logits(q, k, rel_h_tile, rel_w_tile, valid, scale_log2, BLOCK_M, BLOCK_N, R, WP, PRECISION,
                    UPCAST)  # BLOCK_M x BLOCK_N, base 2
        p = tl.exp2(s - lse[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)  # BLOCK_N x HEAD_DIM
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)  # BLOCK_M x BLOCK_N
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
    out_offsets = bh64 * N * D + keys[:, None] * D + offs_d[None, :]
    tl.store(dk_ptr + out_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# Launch configurations for sm_90 (H100 / H200): (BLOCK_M, BLOCK_N, num_warps, num_stages) per
# kernel, for head dims up to 64 (ViT-B/L/H: 64; the tiny model: 32) and above. BLOCK_N must be a
# power of two >= MAX_GRID_W (key blocks hold whole grid rows). ptxas -v for sm_90 (bf16): no
# spills with these (registers per thread, d 64 / d 128): forward 173 / 232, backward query
# 254 / 255, backward key 218 / 255; d 128 with the d 64 backward configs spills 148 / 64 bytes.
# Shared memory (sm_90 allows 232,448 bytes a block) grows with the element size and as the grid
# width shrinks (WP 1 is the largest): float32 with d > 64 runs the forward with 2 stages (3 needs
# 233,984 bytes at WP 16 and 295,424 at WP 1; found on an H200). tests/unit/test_kernel_resources.py
# compiles every configuration for sm_90 and checks its shared memory.
_CONFIGS = {
    "forward": {64: (128, 64, 8, 3), 128: (128, 64, 8, 3)},
    "backward_query": {64: (64, 64, 4, 2), 128: (32, 64, 4, 2)},
    "backward_key": {64: (64, 64, 4, 2), 128: (64, 64, 8, 2)},
}
_FLOAT32_CONFIGS = {("forward", 128): (128, 64, 8, 2)}  # overrides of _CONFIGS for float32 inputs
_INTERPRET_CONFIG = (64, 64, 4, 1)  # the interpreter ignores warps and stages


def _config(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    return _INTERPRET_CONFIG if INTERPRET else _gpu_config(kernel, head_dim, dtype)


def _gpu_config(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    bucket = 64 if head_dim <= 64 else 128
    if dtype == torch.float32 and (kernel, bucket) in _FLOAT32_CONFIGS:
        return _FLOAT32_CONFIGS[kernel, bucket]
    return _CONFIGS[kernel][bucket]


def _geometry(head_dim: int, grid_w: int, block_n: int) -> tuple[int, int, int]:
    """(HEAD_DIM padded to a power of two >= 16, WP = next power of two >= W, R = rows per key block)."""
    wp = triton.next_power_of_2(grid_w)
    return max(16, triton.next_power_of_2(head_dim)), wp, block_n // wp


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype != torch.float32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _batch_slices(batch: int, heads: int) -> list[slice]:
    """Slices of the batch with at most MAX_BATCH_HEADS B x heads each (one kernel launch each)."""
    step = max(1, MAX_BATCH_HEADS // heads)
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def relpos_attention_forward(q, k, v, rel_h, rel_w, grid_w, scale):
    """-> (out B x heads x N x d in q's dtype, contiguous; lse B x heads x N float32, base 2)."""
    batch, heads, tokens, head_dim = q.shape
    if batch * heads > MAX_BATCH_HEADS:
        out = torch.empty((batch, heads, tokens, head_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, tokens), dtype=torch.float32, device=q.device)
        for part in _batch_slices(batch, heads):  # batch slices of contiguous tensors stay contiguous
            out[part], lse[part] = relpos_attention_forward(q[part], k[part], v[part], rel_h[part], rel_w[part],
                                                            grid_w, scale)
        return out, lse
    height = rel_h.shape[-1]
    out = torch.empty((batch, heads, tokens, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, tokens), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_m, block_n, warps, stages = _config("forward", head_dim, q.dtype)
    head_pad, wp, rows = _geometry(head_dim, grid_w, block_n)
    grid = (triton.cdiv(tokens, block_m), batch * heads)
    _forward_kernel[grid](q, k, v, rel_h, rel_w, out, lse, *_strides(q), *_strides(k), *_strides(v),
                          heads, tokens, height, grid_w, head_dim, scale * LOG2E,
                          HEAD_DIM=head_pad, BLOCK_M=block_m, BLOCK_N=block_n, WP=wp, R=rows,
                          PRECISION=_precision(q.dtype), UPCAST=_upcast(q.dtype), num_warps=warps,
                          num_stages=stages)
    return out, lse


def relpos_attention_backward(grad_out, q, k, v, rel_h, rel_w, out, lse, grid_w, scale):
    """-> (dq, dk, dv, d rel_h, d rel_w), contiguous, in the dtypes of the inputs."""
    batch, heads, tokens, head_dim = q.shape
    if batch * heads > MAX_BATCH_HEADS:
        parts = [relpos_attention_backward(grad_out[part], q[part], k[part], v[part], rel_h[part], rel_w[part],
                                           out[part], lse[part], grid_w, scale)
                 for part in _batch_slices(batch, heads)]
        return tuple(torch.cat(grads, dim=0) for grads in zip(*parts))
    height = rel_h.shape[-1]
    dq = torch.empty((batch, heads, tokens, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq, dtype=k.dtype)
    dv = torch.empty_like(dq, dtype=v.dtype)
    d_rel_h = torch.empty(rel_h.shape, dtype=rel_h.dtype, device=q.device)
    d_rel_w = torch.empty(rel_w.shape, dtype=rel_w.dtype, device=q.device)
    if dq.numel() == 0:
        return dq, dk, dv, d_rel_h.zero_(), d_rel_w.zero_()
    if tokens * grad_out.stride(2) >= 2 ** 31:  # int32 token offsets (q, k, v were checked in the forward)
        grad_out = grad_out.contiguous()
    delta = torch.empty((batch, heads, tokens), dtype=torch.float32, device=q.device)
    common = (heads, tokens, height, grid_w, head_dim, scale, scale * LOG2E)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    precision = _precision(q.dtype)
    block_m, block_n, warps, stages = _config("backward_query", head_dim, q.dtype)
    head_pad, wp, rows = _geometry(head_dim, grid_w, block_n)
    _backward_query_kernel[(triton.cdiv(tokens, block_m), batch * heads)](
        q, k, v, rel_h, rel_w, out, grad_out, lse, delta, dq, d_rel_h, d_rel_w, *strides, *common,
        HEAD_DIM=head_pad, BLOCK_M=block_m, BLOCK_N=block_n, WP=wp, R=rows, PRECISION=precision,
        UPCAST=_upcast(q.dtype), num_warps=warps, num_stages=stages)
    block_m, block_n, warps, stages = _config("backward_key", head_dim, q.dtype)
    head_pad, wp, rows = _geometry(head_dim, grid_w, block_n)
    _backward_key_kernel[(triton.cdiv(height, rows), batch * heads)](
        q, k, v, rel_h, rel_w, grad_out, lse, delta, dk, dv, *strides, *common,
        HEAD_DIM=head_pad, BLOCK_M=block_m, BLOCK_N=block_n, WP=wp, R=rows, PRECISION=precision,
        UPCAST=_upcast(q.dtype), num_warps=warps, num_stages=stages)
    return dq, dk, dv, d_rel_h, d_rel_w


class RelPosAttentionFunction(torch.autograd.Function):
    """Flash attention with decomposed relative positions; saves q, k, v, rel_h, rel_w, out and
    the row logsumexp (B x heads x N float32)."""

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, grid_w, scale):
        q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
        rel_h, rel_w = rel_h.contiguous(), rel_w.contiguous()
        out, lse = relpos_attention_forward(q, k, v, rel_h, rel_w, grid_w, scale)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.grid_w, ctx.scale = grid_w, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        refuse_differentiable_backward("relpos_attention")
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        grads = relpos_attention_backward(_unit_last(grad_out), q, k, v, rel_h, rel_w, out, lse,
                                          ctx.grid_w, ctx.scale)
        return (*grads, None, None)


def relpos_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                            rel_w: torch.Tensor, grid_w: int, scale: float) -> torch.Tensor:
    """Triton version of `relpos_attention_reference` (same output and gradients; out contiguous)."""
    _check_triton_inputs(q, k, v, rel_h, rel_w, grid_w)
    return RelPosAttentionFunction.apply(q, k, v, rel_h, rel_w, int(grid_w), float(scale))
