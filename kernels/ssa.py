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
N x (q + 1) similarity matrix: it streams the queue in tiles with an online softmax (running max
and sum), accumulating k_i as a C-vector per row, split over the queue across programs
(flash-decoding style) and merged by a second kernel that also adds the h_i key, writes the
per-row loss and the gradient wrt the raw student rows (through the L2 normalisation). The
gradient is computed in the forward and only scaled by the incoming gradient in the backward.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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
def _ssa_queue_partial_kernel(weak_ptr, queue_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
                              num_rows, queue_len, dim, tiles_per_split, scale_log2,
                              BLOCK_N: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr,
                              PRECISION: tl.constexpr):
    """One (row block, queue split): online softmax of h_i . Q_j / tau over the split's queue rows.
    Writes running max m (log2 units), sum l and acc = sum_j exp2(t_ij - m) Qn_j per row."""
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    channels = tl.arange(0, BLOCK_C)  # BLOCK_C
    row_ok = rows < num_rows
    channel_ok = channels < dim
    weak = tl.load(weak_ptr + rows[:, None].to(tl.int64) * dim + channels[None, :],
                   mask=row_ok[:, None] & channel_ok[None, :], other=0.0).to(tl.float32)
    inv_weak_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(weak * weak, axis=1)), 1e-12)  # BLOCK_N

    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    first = split * tiles_per_split * BLOCK_Q
    last = tl.minimum(first + tiles_per_split * BLOCK_Q, queue_len)
    for start in range(first, last, BLOCK_Q):
        keys = start + tl.arange(0, BLOCK_Q)  # BLOCK_Q
        key_ok = keys < queue_len
        queue = tl.load(queue_ptr + keys[:, None].to(tl.int64) * dim + channels[None, :],
                        mask=key_ok[:, None] & channel_ok[None, :], other=0.0).to(tl.float32)
        inv_key_norm = 1.0 / tl.maximum(tl.sqrt(tl.sum(queue * queue, axis=1)), 1e-12)  # BLOCK_Q
        dots = tl.dot(weak, tl.trans(queue), input_precision=PRECISION)  # BLOCK_N x BLOCK_Q
        # target logits in log2 units: h_i . Qn_j / tau * log2(e)
        logits = dots * inv_weak_norm[:, None] * (inv_key_norm * scale_log2)[None, :]
        logits = tl.where(key_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(logits - new_max[:, None])  # BLOCK_N x BLOCK_Q
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + tl.dot(probs * inv_key_norm[None, :], queue,
                                              input_precision=PRECISION)
        running_max = new_max

    part = rows.to(tl.int64) * num_splits + split  # N x splits layout
    tl.store(part_max_ptr + part, running_max, mask=row_ok)
    tl.store(part_sum_ptr + part, running_sum, mask=row_ok)
    tl.store(part_acc_ptr + part[:, None] * dim + channels[None, :], acc,
             mask=row_ok[:, None] & channel_ok[None, :])


@triton.jit
def _ssa_merge_kernel(student_ptr, weak_ptr, part_max_ptr, part_sum_ptr, part_acc_ptr,
                      row_loss_ptr, grad_ptr, num_rows, dim, num_splits, scale_log2, grad_scale,
                      BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Adds the h_i key, merges the queue splits, writes loss_i = 1 - s_i . k_i and
    d(mean loss)/d(raw student row) = J_normalise^T (-k_i / N)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # BLOCK_N
    channels = tl.arange(0, BLOCK_C)
    row_ok = rows < num_rows
    tile_ok = row_ok[:, None] & (channels < dim)[None, :]
    tile = rows[:, None].to(tl.int64) * dim + channels[None, :]
    weak = tl.load(weak_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)  # BLOCK_N x BLOCK_C
    weak = weak / tl.maximum(tl.sqrt(tl.sum(weak * weak, axis=1)), 1e-12)[:, None]
    # the key h_i itself: logit h_i . h_i / tau, weight exp2(0) = 1 relative to its own max
    running_max = tl.sum(weak * weak, axis=1) * scale_log2  # BLOCK_N
    running_sum = tl.full([BLOCK_N], 1.0, dtype=tl.float32)
    acc = weak
    for split in range(0, num_splits):
        part = rows.to(tl.int64) * num_splits + split
        part_max = tl.load(part_max_ptr + part, mask=row_ok, other=float("-inf"))
        part_sum = tl.load(part_sum_ptr + part, mask=row_ok, other=0.0)
        part_acc = tl.load(part_acc_ptr + part[:, None] * dim + channels[None, :], mask=tile_ok,
                           other=0.0)
        new_max = tl.maximum(running_max, part_max)
        old_factor = tl.exp2(running_max - new_max)
        part_factor = tl.exp2(part_max - new_max)
        running_sum = running_sum * old_factor + part_sum * part_factor
        acc = acc * old_factor[:, None] + part_acc * part_factor[:, None]
        running_max = new_max
    key_mean = acc / running_sum[:, None]  # k_i, BLOCK_N x BLOCK_C

    student = tl.load(student_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(student * student, axis=1))  # BLOCK_N
    inv_norm = 1.0 / tl.maximum(norm, 1e-12)
    unit = student * inv_norm[:, None]  # s_i
    tl.store(row_loss_ptr + rows, 1.0 - tl.sum(unit * key_mean, axis=1), mask=row_ok)
    grad_unit = key_mean * (-grad_scale)  # dL/ds_i
    # through s = x / max(||x||, eps): (g - s (s . g)) / ||x||, or g / eps below eps
    projected = grad_unit - unit * tl.sum(unit * grad_unit, axis=1)[:, None]
    grad = tl.where((norm > 1e-12)[:, None], projected, grad_unit) * inv_norm[:, None]
    tl.store(grad_ptr + tile, grad, mask=tile_ok)


_LOG2E = 1.4426950408889634


def _queue_launch_shape(num_rows: int, queue_len: int, block_n: int, block_q: int,
                        device: torch.device, wanted_splits: int | None) -> tuple[int, int]:
    """(tiles_per_split, num_splits): enough programs to fill the GPU, every split non-empty."""
    num_tiles = triton.cdiv(queue_len, block_q)
    if wanted_splits is not None:
        wanted_splits = max(1, wanted_splits)
    elif INTERPRET or device.type != "cuda":
        wanted_splits = 1
    else:
        programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        wanted_splits = max(1, programs // triton.cdiv(num_rows, block_n))
    tiles_per_split = triton.cdiv(num_tiles, min(wanted_splits, num_tiles))
    return tiles_per_split, triton.cdiv(num_tiles, tiles_per_split)


def ssa_forward_triton(student: torch.Tensor, weak: torch.Tensor, queue: torch.Tensor,
                       tau: float, *, queue_splits: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (loss float32 scalar, d loss / d student N x C float32). Needs N >= 1.

    `queue_splits` (tests) asks for that many queue splits instead of the launch heuristic."""
    num_rows, dim = student.shape
    student = student.detach().contiguous()
    weak = weak.detach().contiguous()
    queue = queue.detach().reshape(-1, dim).contiguous()
    queue_len = queue.shape[0]
    device = student.device
    block_c = max(16, triton.next_power_of_2(dim))
    block_n = 64 if block_c <= 256 else 32
    block_q = 64 if block_c <= 256 else 32
    if INTERPRET:
        block_n, block_q = 64, 128
    scale_log2 = _LOG2E / tau
    tiles_per_split, num_splits = (_queue_launch_shape(num_rows, queue_len, block_n, block_q, device,
                                                       queue_splits) if queue_len > 0 else (0, 0))
    part_max = torch.empty((num_rows, num_splits), dtype=torch.float32, device=device)
    part_sum = torch.empty((num_rows, num_splits), dtype=torch.float32, device=device)
    part_acc = torch.empty((num_rows, num_splits, dim), dtype=torch.float32, device=device)
    if num_splits > 0:
        precision = "tf32x3" if device.type == "cuda" else "ieee"
        grid = (triton.cdiv(num_rows, block_n), num_splits)
        _ssa_queue_partial_kernel[grid](weak, queue, part_max, part_sum, part_acc,
                                        num_rows, queue_len, dim, tiles_per_split, scale_log2,
                                        BLOCK_N=block_n, BLOCK_Q=block_q, BLOCK_C=block_c,
                                        PRECISION=precision,
                                        num_warps=8 if block_c >= 256 else 4)
    row_loss = torch.empty(num_rows, dtype=torch.float32, device=device)
    grad = torch.empty((num_rows, dim), dtype=torch.float32, device=device)
    merge_block_n = 64 if INTERPRET else 16
    _ssa_merge_kernel[(triton.cdiv(num_rows, merge_block_n),)](
        student, weak, part_max, part_sum, part_acc, row_loss, grad,
        num_rows, dim, num_splits, scale_log2, 1.0 / num_rows,
        BLOCK_N=merge_block_n, BLOCK_C=block_c, num_warps=4)
    return row_loss.mean(), grad


class SsaLossFunction(torch.autograd.Function):
    """Fused SSA loss; gradient to `student` only (computed in the forward, scaled here)."""

    @staticmethod
    def forward(ctx, student, weak, queue, tau):
        loss, grad = ssa_forward_triton(student, weak, queue, tau)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.student_dtype), None, None, None


def ssa_loss_triton(student: torch.Tensor, weak: torch.Tensor, queue: torch.Tensor,
                    tau: float) -> torch.Tensor:
    """Triton version of `ssa_loss_reference` (same value and gradient wrt `student`)."""
    check_ssa_inputs(student, weak, queue, tau)
    if student.shape[0] == 0:
        return student.sum().float() * 0.0
    return SsaLossFunction.apply(student, weak, queue, float(tau))
