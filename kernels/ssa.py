"""Reinforce: Soft Semantic Alignment (SSA) loss against a FIFO queue of weak embeddings.

Specification. student S (N x C, with grad), weak H (N x C), queue Q (q x C). Every row of S, H
and Q is L2-normalised here, inside the loss (x / max(||x||, 1e-12), as F.normalize), so callers
pass raw box embeddings. With s_i, h_i, Q_j the normalised rows:
    keys     K_i  = [h_i ; Q]                               (q + 1) x C
    targets  w_i  = softmax(h_i K_i^T / tau)                no gradient
    loss     L    = mean_i sum_j w_ij (1 - s_i . K_ij)
An empty queue gives mean_i (1 - cos(s_i, h_i)); N == 0 gives a zero still attached to the
graph of `student`. Gradient flows to `student` (through its normalisation) only: `weak` and
`queue` are treated as constants. The loss is float32 whatever the input dtype.

Since sum_j w_ij = 1, L = mean_i (1 - s_i . k_i) with the weighted key mean
k_i = sum_j w_ij K_ij, and dL/ds_i = -k_i / N. The Triton path therefore never forms the
N x (q + 1) similarity matrix: it streams the queue in tiles, accumulating the softmax sum and
k_i (a C-vector per row) in registers, split over the queue across programs (flash-decoding
style); a second kernel adds the h_i key, merges the splits, and writes the per-row loss and the
gradient wrt the raw student rows (through the L2 normalisation). The gradient is computed in
the forward and only scaled by the incoming gradient in the backward. For float32 (whose tf32x3
products need hi and lo copies of every operand) the partial kernel runs h_i . Q_j over channel
chunks and may split k_i's channels over programs, so that no tile spills registers at C = 256.

Softmax shift. An online softmax tracks a running row maximum because it is unknown. Here it is
known: for unit vectors h_i . Q_j <= 1 = h_i . h_i, so the self logit h_i . h_i / tau bounds
every logit of row i (for a zero h_i all logits are 0 and equal to it). Every exponent is
therefore <= 0 (up to rounding) and the self term is exp(0) = 1: no running maximum, no
rescaling of the accumulator, and the splits merge by plain sums.

Precision. float32 inputs: both products run on tensor cores, as tf32x3 (about float32
accuracy) or, in the SPLIT_BF16 tile configs, as bf16x3: each operand split into a bf16 high
and low part, three bf16 products (about 2^-16 relative per product). Against a float64
reference on the unit tests' spread-weight inputs, bf16x3 keeps the gradient within about 5e-6
of its largest entry and the loss within 1e-7 (the interpreter's float32 products, like the
float32 torch reference, about 5e-7; tf32x3 on a GPU was not measured against float64). The
autotuner keeps whichever tile runs fastest: on an H200 (run 11), tf32x3 at q <= 1024 and the
SPLIT_BF16 tile 128 x 64 (C_PARTS 2, K_CHUNKS 8) at q = 8192 and 65536. So the float32 result's
last digits depend on the tile picked, which may differ between queue lengths, machines and
runs. bfloat16 inputs: h . Q runs on the raw bf16 values (exact products, float32
accumulation; the norms are applied afterwards in float32), and the weights enter the second
product split into a bf16 high and low part (about 16 mantissa bits). Other dtypes are upcast to
float32. The interpreter computes all of it in float32 numpy.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resam_kernels.launch import refuse_tuning_while_capturing

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

NORM_EPS = 1e-12


def check_ssa_inputs(student: torch.Tensor, weak: torch.Tensor, queue: torch.Tensor,
                     tau: float) -> None:
    if student.dim() != 2 or weak.shape != student.shape:
        raise ValueError(f"ssa_loss needs student and weak shaped N x C alike, got "
                         f"{tuple(student.shape)} and {tuple(weak.shape)}")
    if queue.dim() != 2 or (queue.shape[0] > 0 and queue.shape[1] != student.shape[1]):
        raise ValueError(f"ssa_loss needs the queue shaped q x C with C = {student.shape[1]}, "
                         f"got {tuple(queue.shape)}")
    if not tau > 0:
        raise ValueError(f"ssa_loss needs a positive temperature tau, got {tau}")


def ssa_loss_reference(student: torch.Tensor, weak: torch.Tensor, queue: torch.Tensor,
                       tau: float) -> torch.Tensor:
    """The specification in torch (differentiable wrt `student`). Shapes: N x C, N x C, q x C."""
    check_ssa_inputs(student, weak, queue, tau)
    if student.shape[0] == 0:
        return student.sum().float() * 0.0
    s = F.normalize(student.float(), dim=1, eps=NORM_EPS)  # N x C
    with torch.no_grad():
        h = F.normalize(weak.detach().float(), dim=1, eps=NORM_EPS)  # N x C
        q = F.normalize(queue.detach().float().reshape(-1, student.shape[1]), dim=1, eps=NORM_EPS)
        target_logits = torch.cat([(h * h).sum(dim=1, keepdim=True), h @ q.T], dim=1) / tau
        weights = torch.softmax(target_logits, dim=1)  # N x (q + 1)
    similarity = torch.cat([(s * h).sum(dim=1, keepdim=True), s @ q.T], dim=1)  # N x (q + 1)
    return (weights * (1.0 - similarity)).sum(dim=1).mean()


@triton.jit
def _bf16_dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b for bf16 a, b with float32 accumulation. Triton's interpreter multiplies bf16
    operands as raw integers, so there (UPCAST) they go through float32, which is exact."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _round_bf16(x, EMULATE: tl.constexpr):
    """float32 x -> bf16, rounded to nearest even as the GPU's conversion does. Triton's
    interpreter truncates instead, so there (EMULATE) the rounding is done on the bits first
    (finite x), after which the conversion is exact."""
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(tl.bfloat16)


@triton.jit
def _split_bf16(x, EMULATE: tl.constexpr):
    """float32 x -> (high, low) bf16 with x = high + low up to 2^-18 |x| (float32 has 24
    significant bits, high and low 8 each, both rounded to nearest)."""
    high = _round_bf16(x, EMULATE)
    low = _round_bf16(x - high.to(tl.float32), EMULATE)
    return high, low


@triton.jit
def _bf16x3_dot(a_high, a_low, b_high, b_low, acc, UPCAST: tl.constexpr):
    """acc + a @ b from bf16 split operands: three bf16 products, small terms first (the
    low x low term, about 2^-18 relative, is dropped)."""
    acc = _bf16_dot(a_low, b_high, acc, UPCAST)
    acc = _bf16_dot(a_high, b_low, acc, UPCAST)
    return _bf16_dot(a_high, b_high, acc, UPCAST)


@triton.jit
def _ssa_queue_partial_kernel(weak_ptr, queue_ptr, part_sum_ptr, part_acc_ptr,
                              num_rows, queue_len, dim, split_len, scale_log2, size_class,
                              BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
                              C_PARTS: tl.constexpr, K_CHUNKS: tl.constexpr,
                              SPLIT_BF16: tl.constexpr, BF16_DOT: tl.constexpr,
                              UPCAST_BF16_DOT: tl.constexpr):
    """One (row block, queue split, channel part): over the split's queue rows j, with
    t_ij = h_i . Qn_j / tau in log2 units and the fixed shift m_i = h_i . h_i / tau, writes per row
    sum_j exp2(t_ij - m_i) (channel part 0 only) and the part's channels of
    acc_i = sum_j exp2(t_ij - m_i) Qn_j (Qn: normalised queue rows).

    C_PARTS > 1 splits the channels of acc_i over programs (grid axis 2; every part computes the
    full h_i . Q_j). K_CHUNKS > 1 runs that product over channel chunks of BLOCK_C // K_CHUNKS
    (weak and queue chunks reloaded per queue tile, from cache) instead of holding the whole
    BLOCK_N x BLOCK_C and BLOCK_Q x BLOCK_C operands at once: both cut float32 registers.

    SPLIT_BF16 (float32 inputs only) runs both products as bf16x3 instead of tf32x3: every
    float32 operand is split into a bf16 high and low part and each product is three bf16
    tensor-core products. With K_CHUNKS == C_PARTS == 1 the weak rows are split once per program
    and each queue tile once for both products; otherwise each chunk is split as it is loaded
    (the weak chunks once per queue tile). Unlike tf32, bf16 operands of Hopper's wgmma may be
    transposed in shared memory, which the queue tile is in the second product."""
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    row_ok = rows < num_rows
    weak_rows = weak_ptr + rows[:, None].to(tl.int64) * dim  # BLOCK_N x 1
    # this program's channels of acc_i
    own = tl.program_id(2) * (BLOCK_C // C_PARTS) + tl.arange(0, BLOCK_C // C_PARTS)
    own_ok = own < dim
    chunk = tl.arange(0, BLOCK_C // K_CHUNKS)  # BLOCK_K
    if K_CHUNKS == 1:  # the whole weak tile stays in registers across the queue loop
        weak = tl.load(weak_rows + chunk[None, :], mask=row_ok[:, None] & (chunk < dim)[None, :],
                       other=0.0)  # BLOCK_N x BLOCK_C
        weak_f32 = weak.to(tl.float32)
        weak_sq = tl.sum(weak_f32 * weak_f32, axis=1)  # BLOCK_N
        if not BF16_DOT:
            weak = weak_f32
            if SPLIT_BF16:  # split once, reused for every queue tile
                # BLOCK_N x BLOCK_C each
                weak_high, weak_low = _split_bf16(weak_f32, UPCAST_BF16_DOT)
    else:
        weak_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for c0 in range(0, BLOCK_C, BLOCK_C // K_CHUNKS):
            part_weak = tl.load(weak_rows + (c0 + chunk)[None, :],
                                mask=row_ok[:, None] & (c0 + chunk < dim)[None, :],
                                other=0.0).to(tl.float32)  # BLOCK_N x BLOCK_K
            weak_sq += tl.sum(part_weak * part_weak, axis=1)
    inv_weak_norm = 1.0 / tl.maximum(tl.sqrt(weak_sq), 1e-12)
    shift = weak_sq * inv_weak_norm * inv_weak_norm * scale_log2  # self logit, log2 units
    row_scale = inv_weak_norm * scale_log2

    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C // C_PARTS], dtype=tl.float32)
    first = split * split_len
    last = tl.minimum(first + split_len, queue_len)
    for start in range(first, last, BLOCK_Q):
        keys = start + tl.arange(0, BLOCK_Q)  # BLOCK_Q
        key_ok = keys < queue_len
        queue_rows = queue_ptr + keys[:, None].to(tl.int64) * dim  # BLOCK_Q x 1
        if K_CHUNKS == 1:
            queue = tl.load(queue_rows + chunk[None, :],
                            mask=key_ok[:, None] & (chunk < dim)[None, :],
                            other=0.0)  # BLOCK_Q x BLOCK_C
            queue_f32 = queue.to(tl.float32)
            key_sq = tl.sum(queue_f32 * queue_f32, axis=1)  # BLOCK_Q
            if BF16_DOT:
                dots = _bf16_dot(weak, tl.trans(queue), tl.zeros([BLOCK_N, BLOCK_Q], tl.float32),
                                 UPCAST_BF16_DOT)  # exact bf16 products, float32 sums
            elif SPLIT_BF16:
                # BLOCK_Q x BLOCK_C each
                queue_high, queue_low = _split_bf16(queue_f32, UPCAST_BF16_DOT)
                dots = _bf16x3_dot(weak_high, weak_low, tl.trans(queue_high), tl.trans(queue_low),
                                   tl.zeros([BLOCK_N, BLOCK_Q], tl.float32), UPCAST_BF16_DOT)
            else:
                dots = tl.dot(weak, tl.trans(queue_f32), input_precision="tf32x3")
        else:
            key_sq = tl.zeros([BLOCK_Q], dtype=tl.float32)
            dots = tl.zeros([BLOCK_N, BLOCK_Q], dtype=tl.float32)
            for c0 in range(0, BLOCK_C, BLOCK_C // K_CHUNKS):
                chunk_ok = (c0 + chunk < dim)[None, :]
                part_weak = tl.load(weak_rows + (c0 + chunk)[None, :],
                                    mask=row_ok[:, None] & chunk_ok, other=0.0)  # BLOCK_N x BLOCK_K
                part_queue = tl.load(queue_rows + (c0 + chunk)[None, :],
                                     mask=key_ok[:, None] & chunk_ok, other=0.0)  # BLOCK_Q x BLOCK_K
                part_queue_f32 = part_queue.to(tl.float32)
                key_sq += tl.sum(part_queue_f32 * part_queue_f32, axis=1)
                if BF16_DOT:
                    dots = _bf16_dot(part_weak, tl.trans(part_queue), dots, UPCAST_BF16_DOT)
                elif SPLIT_BF16:
                    chunk_high, chunk_low = _split_bf16(part_weak.to(tl.float32),
                                                        UPCAST_BF16_DOT)  # BLOCK_N x BLOCK_K
                    key_high, key_low = _split_bf16(part_queue_f32,
                                                    UPCAST_BF16_DOT)  # BLOCK_Q x BLOCK_K
                    dots = _bf16x3_dot(chunk_high, chunk_low, tl.trans(key_high), tl.trans(key_low),
                                       dots, UPCAST_BF16_DOT)
                else:
                    dots = tl.dot(part_weak.to(tl.float32), tl.trans(part_queue_f32), dots,
                                  input_precision="tf32x3")
        inv_key_norm = 1.0 / tl.maximum(tl.sqrt(key_sq), 1e-12)
        logits = dots * row_scale[:, None] * inv_key_norm[None, :]  # BLOCK_N x BLOCK_Q
        weights = tl.exp2(logits - shift[:, None])
        weights = tl.where(key_ok[None, :], weights, 0.0)
        total += tl.sum(weights, axis=1)
        scaled = weights * inv_key_norm[None, :]  # weights of the raw queue rows
        if C_PARTS == 1 and K_CHUNKS == 1:
            values = queue  # BLOCK_Q x BLOCK_C, already loaded
        else:  # this program's channels of the tile (just read: a cache hit)
            values = tl.load(queue_rows + own[None, :], mask=key_ok[:, None] & own_ok[None, :],
                             other=0.0)  # BLOCK_Q x BLOCK_CA
        if BF16_DOT:
            high, low = _split_bf16(scaled, UPCAST_BF16_DOT)  # BLOCK_N x BLOCK_Q each
            acc = _bf16_dot(high, values, acc, UPCAST_BF16_DOT)
            acc = _bf16_dot(low, values, acc, UPCAST_BF16_DOT)
        elif SPLIT_BF16:
            scaled_high, scaled_low = _split_bf16(scaled, UPCAST_BF16_DOT)  # BLOCK_N x BLOCK_Q each
            if C_PARTS == 1 and K_CHUNKS == 1:
                values_high, values_low = queue_high, queue_low  # split above
            else:
                values_high, values_low = _split_bf16(values.to(tl.float32),
                                                      UPCAST_BF16_DOT)  # BLOCK_Q x BLOCK_CA
            acc = _bf16x3_dot(scaled_high, scaled_low, values_high, values_low, acc,
                              UPCAST_BF16_DOT)
        else:
            acc = tl.dot(scaled, values.to(tl.float32), acc, input_precision="tf32x3")

    part = rows.to(tl.int64) * num_splits + split  # N x splits layout
    if C_PARTS == 1:  # (a separate branch: keeps the bf16 code as it was, see the configs)
        tl.store(part_sum_ptr + part, total, mask=row_ok)
    elif tl.program_id(2) == 0:  # every channel part has the same sum
        tl.store(part_sum_ptr + part, total, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * dim + own[None, :], acc,
             mask=row_ok[:, None] & own_ok[None, :])


def _tile(block_n, block_q, c_parts, k_chunks, num_warps, num_stages, split_bf16=False):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_Q": block_q, "C_PARTS": c_parts,
                          "K_CHUNKS": k_chunks, "SPLIT_BF16": split_bf16},
                         num_warps=num_warps, num_stages=num_stages)


# The GPU picks its tile shape on first use per (dim, size class, dtype): the size class is the
# bit length of queue rows per split (a growing queue re-tunes at most once per power of two).
# Configs that do not fit the device's shared memory or registers are dropped by the autotuner.
# Tiles: (BLOCK_N, BLOCK_Q, C_PARTS, K_CHUNKS, warps, stages[, SPLIT_BF16]).
# bf16: whole-width tiles (C_PARTS = K_CHUNKS = 1), the configs of before the channel split.
_PARTIAL_CONFIGS_BF16 = [
    _tile(16, 32, 1, 1, 4, 2),
    _tile(16, 64, 1, 1, 4, 2),
    _tile(32, 64, 1, 1, 4, 2),
    _tile(32, 32, 1, 1, 4, 2),
    _tile(64, 32, 1, 1, 4, 2),
    _tile(64, 64, 1, 1, 8, 2),
    _tile(128, 32, 1, 1, 8, 2),
    _tile(64, 32, 1, 1, 8, 1),
    _tile(128, 64, 1, 1, 8, 1),
    _tile(16, 32, 1, 1, 8, 2),
    # sm_90 ptxas: 166 registers, no spill; deeper load pipelining for long splits
    _tile(16, 64, 1, 1, 4, 3),
]
# float32 (tf32x3): whole-width tiles spill registers in every config at C = 256 (sm_90 ptxas,
# triton 3.8: 136 to 29156 bytes). Every config below runs h . Q in channel chunks (K_CHUNKS),
# some also split acc_i over programs (C_PARTS, which recomputes h . Q once per part but lets
# 64- and 128-row tiles fit); sm_90 ptxas at C = 256: 166 to 254 registers, no spill.
_PARTIAL_CONFIGS_F32 = [
    _tile(16, 32, 1, 4, 8, 2),
    _tile(16, 32, 1, 2, 8, 2),
    _tile(16, 64, 1, 4, 8, 2),
    _tile(16, 64, 1, 8, 8, 2),
    _tile(16, 64, 1, 4, 8, 3),
    _tile(32, 32, 1, 8, 8, 2),
    _tile(16, 32, 1, 4, 4, 2),
    _tile(16, 32, 2, 2, 8, 2),
    _tile(16, 64, 2, 4, 8, 2),
    _tile(64, 32, 2, 8, 8, 2),
    _tile(64, 32, 4, 8, 8, 2),
    _tile(128, 32, 4, 8, 8, 2),
    # SPLIT_BF16 (bf16x3 products; on an H200, run 11, picked at q = 8192 and 65536, where
    # fwd + bwd at N = 400 went from 1.96 to 1.10 ms at q = 65536): 128-row tiles run on Hopper wgmma
    # (M a multiple of 64 per warpgroup), so N = 400 rows re-read the queue 4 times per channel
    # part instead of 25 times. sm_90 ptxas at C = 256 (triton 3.8), registers / shared bytes,
    # no spill: 236 / 32768 (16 x 32, mma.sync), 234 / 32768 (64 x 32), 246 / 65536,
    # 209 / 65536, 252 / 65536, 222 / 40960, 247 / 106496 (128 rows, in the order below).
    # Spilling at C = 256, so not listed: whole-width tiles (K_CHUNKS = 1, 568 bytes and up),
    # every other 64-row tile tried (BLOCK_Q 32 to 128, C_PARTS 1 to 4, 92 bytes and up), and
    # at 128 rows 64 x (C_PARTS, K_CHUNKS) = (1, 4) or (2, 4) and 128 x (4, 8).
    _tile(16, 32, 1, 4, 4, 2, split_bf16=True),
    _tile(64, 32, 2, 8, 4, 2, split_bf16=True),
    _tile(128, 32, 2, 4, 8, 2, split_bf16=True),
    _tile(128, 32, 2, 8, 8, 2, split_bf16=True),
    _tile(128, 64, 2, 8, 8, 2, split_bf16=True),
    _tile(128, 64, 4, 8, 8, 2, split_bf16=True),
    _tile(128, 32, 2, 4, 8, 3, split_bf16=True),
]
# tl.dot needs every tile side >= 16: channel chunks and parts never narrower than 16
MIN_CHANNEL_TILE = 16


def _fit_channel_tiles(configs, named_args, **kwargs):
    """Autotuner pruning: caps C_PARTS and K_CHUNKS at BLOCK_C // 16 (small C), without duplicates."""
    limit = kwargs["BLOCK_C"] // MIN_CHANNEL_TILE
    fitted = {}
    for config in configs:
        meta = dict(config.kwargs, C_PARTS=min(config.kwargs["C_PARTS"], limit),
                    K_CHUNKS=min(config.kwargs["K_CHUNKS"], limit))
        tag = (tuple(sorted(meta.items())), config.num_warps, config.num_stages)
        fitted.setdefault(tag, triton.Config(meta, num_warps=config.num_warps,
                                             num_stages=config.num_stages))
    return list(fitted.values())


_ssa_queue_partial_kernel_bf16 = triton.autotune(
    configs=_PARTIAL_CONFIGS_BF16, key=["dim", "size_class"])(_ssa_queue_partial_kernel)
_ssa_queue_partial_kernel_f32 = triton.autotune(
    configs=_PARTIAL_CONFIGS_F32, key=["dim", "size_class"],
    prune_configs_by={"early_config_prune": _fit_channel_tiles})(_ssa_queue_partial_kernel)
# The size classes launched through the autotuners so far: (bf16 products, dim, size class).
_TUNED_SIZES: set[tuple] = set()
# split_len is a multiple of every BLOCK_Q above, so splits never share a queue tile
_SPLIT_QUANTUM = 128


@triton.jit
def _ssa_merge_kernel(student_ptr, weak_ptr, part_sum_ptr, part_acc_ptr, row_loss_ptr, grad_ptr,
                      num_rows, dim, num_splits, grad_scale,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_GRAD: tl.constexpr):
    """Adds the h_i key (weight exp2(0) = 1), sums the queue splits, and writes
    loss_i = 1 - s_i . k_i and, with WRITE_GRAD, d(mean loss)/d(raw student row) =
    J_normalise^T (-k_i / N)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    channels = tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    tile_ok = row_ok[:, None] & (channels < dim)[None, :]
    tile = rows[:, None].to(tl.int64) * dim + channels[None, :]
    weak = tl.load(weak_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)  # BLOCK_N x BLOCK_C
    total = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    acc = weak / tl.maximum(tl.sqrt(tl.sum(weak * weak, axis=1)), 1e-12)[:, None]  # h_i
    for split in range(0, num_splits):
        part = rows.to(tl.int64) * num_splits + split
        total += tl.load(part_sum_ptr + part, mask=row_ok, other=0.0)
        acc += tl.load(part_acc_ptr + part[:, None] * dim + channels[None, :], mask=tile_ok,
                       other=0.0)
    key_mean = acc / total[:, None]  # k_i, BLOCK_N x BLOCK_C

    student = tl.load(student_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(student * student, axis=1))  # BLOCK_N
    inv_norm = 1.0 / tl.maximum(norm, 1e-12)
    unit = student * inv_norm[:, None]  # s_i
    tl.store(row_loss_ptr + rows, 1.0 - tl.sum(unit * key_mean, axis=1), mask=row_ok)
    if not WRITE_GRAD:
        return
    grad_unit = key_mean * (-grad_scale)  # dL/ds_i
    # through s = x / max(||x||, eps): (g - s (s . g)) / ||x||, or g / eps below eps
    projected = grad_unit - unit * tl.sum(unit * grad_unit, axis=1)[:, None]
    grad = tl.where((norm > 1e-12)[:, None], projected, grad_unit) * inv_norm[:, None]
    tl.store(grad_ptr + tile, grad, mask=tile_ok)


_LOG2E = 1.4426950408889634


def _queue_split_len(num_rows: int, queue_len: int, device: torch.device,
                     wanted_splits: int | None) -> int:
    """Queue rows per split (a multiple of _SPLIT_QUANTUM): enough programs to fill the GPU."""
    if wanted_splits is None:
        if INTERPRET or device.type != "cuda":
            wanted_splits = 1
        else:
            programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
            wanted_splits = programs // triton.cdiv(num_rows, 64)
    split_len = triton.cdiv(queue_len, max(1, wanted_splits))
    return triton.cdiv(split_len, _SPLIT_QUANTUM) * _SPLIT_QUANTUM


def ssa_forward_triton(student: torch.Tensor, weak: torch.Tensor, queue: torch.Tensor,
                       tau: float, *, queue_splits: int | None = None, channel_parts: int = 1,
                       channel_chunks: int = 1, split_bf16: bool = False,
                       with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (loss float32 scalar, d loss / d student N x C float32, or None without `with_grad`).
    Needs N >= 1.

    `queue_splits` (tests) asks for that many queue splits instead of the launch heuristic;
    `channel_parts` and `channel_chunks` (tests) set C_PARTS and K_CHUNKS of the interpreter
    launch (powers of two, with BLOCK_C divided by them >= 16; the GPU autotunes both);
    `split_bf16` (tests) sets SPLIT_BF16 of the interpreter launch for float32 inputs."""
    num_rows, dim = student.shape
    device = student.device
    student = student.detach().contiguous()
    weak = weak.detach()
    queue = queue.detach().reshape(-1, dim)
    bf16_dot = weak.dtype == torch.bfloat16 and queue.dtype == torch.bfloat16
    if not bf16_dot:  # float32 path; other dtypes are upcast (no copy for float32)
        weak, queue = weak.float(), queue.float()
    weak, queue = weak.contiguous(), queue.contiguous()
    queue_len = queue.shape[0]
    block_c = max(16, triton.next_power_of_2(dim))
    scale_log2 = _LOG2E / tau

    split_len = _queue_split_len(num_rows, queue_len, device, queue_splits) if queue_len else 1
    num_splits = triton.cdiv(queue_len, split_len)
    part_sum = torch.empty((num_rows, num_splits), dtype=torch.float32, device=device)
    part_acc = torch.empty((num_rows, num_splits, dim), dtype=torch.float32, device=device)
    if num_splits > 0:
        size_class = split_len.bit_length()  # autotuning bucket, not read by the kernel
        args = (weak, queue, part_sum, part_acc, num_rows, queue_len, dim, split_len, scale_log2, size_class)
        if INTERPRET:
            _ssa_queue_partial_kernel[(triton.cdiv(num_rows, 64), num_splits, channel_parts)](
                *args, BLOCK_N=64, BLOCK_Q=_SPLIT_QUANTUM, BLOCK_C=block_c, C_PARTS=channel_parts,
                K_CHUNKS=channel_chunks, SPLIT_BF16=split_bf16 and not bf16_dot, BF16_DOT=bf16_dot,
                UPCAST_BF16_DOT=True)
        else:
            tuned = _ssa_queue_partial_kernel_bf16 if bf16_dot else _ssa_queue_partial_kernel_f32
            grid = lambda meta: (triton.cdiv(num_rows, meta["BLOCK_N"]), num_splits, meta["C_PARTS"])
            tuned_size = (bf16_dot, dim, size_class)
            if tuned_size not in _TUNED_SIZES:
                refuse_tuning_while_capturing("ssa_loss", tuned_size)
            tuned[grid](*args, BLOCK_C=block_c, BF16_DOT=bf16_dot, UPCAST_BF16_DOT=False)
            _TUNED_SIZES.add(tuned_size)
    row_loss = torch.empty(num_rows, dtype=torch.float32, device=device)
    grad = torch.empty((num_rows, dim) if with_grad else (1,), dtype=torch.float32, device=device)
    merge_block_n = 64 if INTERPRET else 16
    _ssa_merge_kernel[(triton.cdiv(num_rows, merge_block_n),)](
        student, weak, part_sum, part_acc, row_loss, grad, num_rows, dim, num_splits,
        1.0 / num_rows, BLOCK_N=merge_block_n, BLOCK_C=block_c, WRITE_GRAD=with_grad, num_warps=4)
    return row_loss.mean(), grad if with_grad else None


class SsaLossFunction(torch.autograd.Function):
    """Fused SSA loss; gradient to `student` only (computed in the forward, scaled here). A
    backward that must itself be differentiable (`create_graph=True`, e.g. a Hessian-vector
    product) takes the gradient from autograd of the reference instead."""

    @staticmethod
    def forward(ctx, student, weak, queue, tau):
        loss, grad = ssa_forward_triton(student, weak, queue, tau)
        ctx.save_for_backward(grad, student, weak, queue)
        ctx.tau = tau
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, student, weak, queue = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the fused gradient has no graph of its own
            loss = ssa_loss_reference(student, weak, queue, ctx.tau)
            (grad,) = torch.autograd.grad(loss, student, create_graph=True)
        return (grad * grad_loss).to(student.dtype), None, None, None


def ssa_loss_triton(student: torch.Tensor, weak: torch.Tensor, queue: torch.Tensor,
                    tau: float) -> torch.Tensor:
    """Triton version of `ssa_loss_reference` (same value and gradient wrt `student`)."""
    check_ssa_inputs(student, weak, queue, tau)
    if student.shape[0] == 0:
        return student.sum().float() * 0.0
    if not (torch.is_grad_enabled() and student.requires_grad):
        # weak and queue are constants of the loss: no graph, and no gradient computed
        return ssa_forward_triton(student, weak, queue, float(tau), with_grad=False)[0]
    return SsaLossFunction.apply(student, weak, queue, float(tau))
