"""Flash attention with decomposed relative positions: the Triton kernels against autograd of the
torch reference, and the reference against SAM's own `Attention`.

Under TRITON_INTERPRET=1 every kernel uses 64-query x 64-key blocks. Key blocks hold whole grid
rows (R = 64 / next_power_of_2(W) rows each): W = 1 (R 64), W = 5 (R 8, 3 of 8 lanes masked per
row), W = 14 (R 4; 196 tokens = 4 query blocks, the last one partial, and 4 key blocks, the last
one half empty), W = 16 (R 4, 128 tokens = exactly 2 blocks), W = 40 (R 1: one row per key
block, the path of ViT's 64 x 64 global attention, 24 of 64 lanes masked).
"""

import sys

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

import resam_kernels
from resam_kernels.relpos_attention import (MAX_GRID_W, relpos_attention_reference,
                                            relpos_attention_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(batch, heads, height, width, head_dim, dtype, seed):
    """q, k, v ~ N(0, 1) and rel_h, rel_w ~ N(0, 1) (logits of a few units, as in SAM), all
    requiring grad, and an upstream gradient."""
    generator = torch.Generator().manual_seed(seed)
    tokens = height * width

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(dtype).to(DEVICE).requires_grad_(True)

    q, k, v = (tensor(batch, heads, tokens, head_dim) for _ in range(3))
    rel_h, rel_w = tensor(batch, heads, tokens, height), tensor(batch, heads, tokens, width)
    upstream = torch.randn(batch, heads, tokens, head_dim, generator=generator).to(dtype).to(DEVICE)
    return (q, k, v, rel_h, rel_w), upstream


def output_and_gradients(fn, inputs, upstream, grid_w):
    scale = inputs[0].shape[-1] ** -0.5
    out = fn(*inputs, grid_w, scale)
    return (out, *torch.autograd.grad(out, inputs, upstream))


def assert_matches_reference(inputs, upstream, grid_w):
    results = output_and_gradients(relpos_attention_triton, inputs, upstream, grid_w)
    expected = output_and_gradients(relpos_attention_reference, inputs, upstream, grid_w)
    for name, got, want, source in zip(("out", "dq", "dk", "dv", "d_rel_h", "d_rel_w"), results, expected,
                                       (inputs[0], *inputs)):
        assert got.dtype == source.dtype and got.shape == source.shape, name
        scale = max(want.float().abs().max().item(), 1.0) if want.numel() else 1.0
        if source.dtype == torch.float32:  # same float32 math, other summation order
            torch.testing.assert_close(got, want, atol=2e-5 * scale, rtol=1e-4, msg=name)
        else:
            # the kernels round P (for P v and P^T dO) and dS (for dS k, dS^T q) to bf16 like any
            # flash attention; the reference keeps float32 until the end; both round the result
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * scale, rtol=2e-2, msg=name)


GRIDS = [(1, 1), (3, 5), (14, 14), (8, 16), (3, 40)]


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 3)])
def test_float32_d16(batch, heads, grid):
    inputs, upstream = make_inputs(batch, heads, *grid, 16, torch.float32, seed=sum(grid) + heads)
    assert_matches_reference(inputs, upstream, grid[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", GRIDS)
def test_d64(grid, dtype):
    inputs, upstream = make_inputs(1, 1, *grid, 64, dtype, seed=7 * sum(grid))
    assert_matches_reference(inputs, upstream, grid[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 24])  # 24: padded to 32 lanes inside the kernels
def test_other_head_dims(dtype, head_dim):
    inputs, upstream = make_inputs(2, 3, 3, 5, head_dim, dtype, seed=head_dim)
    assert_matches_reference(inputs, upstream, 5)


def test_bfloat16_batch_heads_window():
    """2 x 3 windows of 14 x 14 tokens in bf16 (the shape of SAM's windowed blocks)."""
    inputs, upstream = make_inputs(2, 3, 14, 14, 16, torch.bfloat16, seed=3)
    assert_matches_reference(inputs, upstream, 14)


def test_large_logits_and_views():
    """Strongly peaked softmax (logits of tens: the online maximum moves between key blocks) and
    q, k, v as strided views of one qkv tensor, as SAM's attention makes them."""
    generator = torch.Generator().manual_seed(11)
    batch, heads, height, width, head_dim = 1, 2, 14, 14, 16
    tokens = height * width
    qkv = (torch.randn(batch, tokens, 3, heads, head_dim, generator=generator) * 3).to(DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).requires_grad_(True).unbind(0)  # B x heads x N x d views
    assert not q.is_contiguous()
    rel_h = (torch.randn(batch, heads, tokens, height, generator=generator) * 8).to(DEVICE).requires_grad_(True)
    rel_w = (torch.randn(batch, heads, tokens, width, generator=generator) * 8).to(DEVICE).requires_grad_(True)
    upstream = torch.randn(batch, heads, tokens, head_dim, generator=generator).to(DEVICE)
    assert_matches_reference((q, k, v, rel_h, rel_w), upstream, width)


@pytest.mark.parametrize("grid", [(3, 40), (14, 14)])
def test_key_blocks_masked_by_minus_infinity(grid):
    """rel_h of -inf on key row 0 (a whole key block at W = 40, R = 1; part of one at W = 14) for
    every query: the running maximum stays -inf over that block, and the kernel must not compute
    exp2(-inf - -inf) = NaN there."""
    height, width = grid
    inputs, upstream = make_inputs(1, 2, height, width, 16, torch.float32, seed=12)
    with torch.no_grad():
        inputs[3][..., 0] = float("-inf")
    out = relpos_attention_triton(*inputs, width, 0.25)
    assert out.isfinite().all()
    assert_matches_reference(inputs, upstream, width)


def test_dispatcher():
    inputs, _ = make_inputs(1, 2, 3, 5, 16, torch.float32, seed=5)
    expected = relpos_attention_reference(*inputs, 5, 0.25)
    for use_triton in (True, False):
        out = resam_kernels.relpos_attention(*inputs, 5, 0.25, use_triton=use_triton)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,height,width", [(0, 3, 5), (2, 0, 5)])
def test_empty_inputs(batch, height, width):
    inputs, upstream = make_inputs(batch, 2, height, width, 16, torch.float32, seed=0)
    out, *grads = output_and_gradients(relpos_attention_triton, inputs, upstream, width)
    assert out.shape == inputs[0].shape
    assert all(grad.shape == source.shape for grad, source in zip(grads, inputs))


def test_input_errors():
    inputs, _ = make_inputs(1, 1, 2, 3, 16, torch.float32, seed=0)
    q, k, v, rel_h, rel_w = inputs
    with pytest.raises(ValueError, match="N = H W"):
        relpos_attention_triton(q, k, v, rel_h, rel_w, 2, 1.0)  # rel_w has 3 columns
    with pytest.raises(ValueError, match="one shape"):
        relpos_attention_triton(q, k[..., :8], v, rel_h, rel_w, 3, 1.0)
    with pytest.raises(ValueError, match="one dtype"):
        relpos_attention_triton(q, k.bfloat16(), v, rel_h, rel_w, 3, 1.0)
    wide, _ = make_inputs(1, 1, 1, MAX_GRID_W + 1, 16, torch.float32, seed=0)
    with pytest.raises(ValueError, match="grid widths"):
        relpos_attention_triton(*wide, MAX_GRID_W + 1, 1.0)
    deep, _ = make_inputs(1, 1, 1, 2, 136, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head dims"):
        relpos_attention_triton(*deep, 2, 1.0)
    # the reference checks the shapes too
    with pytest.raises(ValueError, match="N = H W"):
        relpos_attention_reference(q, k, v, rel_h, rel_w, 2, 1.0)


@pytest.mark.parametrize("head_dim,grid", [(64, (14, 14)), (80, (5, 7)), (80, (3, 33))])
def test_gpu_launch_configurations(monkeypatch, head_dim, grid):
    """The sm_90 tile shapes (forward 128 queries a block; backward 64, or 32 queries for d > 64:
    ViT-H's d = 80, padded to 128) instead of the interpreter's 64 x 64, in the interpreter."""
    module = sys.modules["resam_kernels.relpos_attention"]
    monkeypatch.setattr(module, "_config", module._gpu_config)
    inputs, upstream = make_inputs(1, 2, *grid, head_dim, torch.float32, seed=head_dim)
    assert_matches_reference(inputs, upstream, grid[1])


def test_more_batch_heads_than_one_launch(monkeypatch):
    """B x heads beyond a launch's grid axis 1 (SAM's windowed blocks: B x 25 windows x heads, over
    65535 from about 200 ViT-B images) run as several launches over batch slices; the limit is
    lowered to 4 here, so 3 x 2 batch-heads take launches of 2 x 2 and 1 x 2, forward and backward."""
    monkeypatch.setattr(sys.modules["resam_kernels.relpos_attention"], "MAX_BATCH_HEADS", 4)
    inputs, upstream = make_inputs(3, 2, 3, 5, 16, torch.float32, seed=12)
    assert_matches_reference(inputs, upstream, 5)


@pytest.mark.parametrize("height,width", [(14, 14), (7, 9)])
def test_reference_equals_sam_attention(height, width):
    """rel_h / rel_w as SAM's add_decomposed_rel_pos computes them from q and its tables: the
    reference (and so the kernels) give SAM's attention output, and its gradients."""
    torch.manual_seed(height + width)
    dim, heads, batch = 48, 3, 2
    sam = Attention(dim, heads, use_rel_pos=True, input_size=(height, width))
    sam.rel_pos_h.data.normal_(0, 0.7)
    sam.rel_pos_w.data.normal_(0, 0.7)
    x = torch.randn(batch, height, width, dim, requires_grad=True)
    expected = sam(x)
    upstream = torch.randn_like(expected)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)

    tokens, head_dim = height * width, dim // heads
    qkv = sam.qkv(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # B x heads x N x d
    rel_rows = get_rel_pos(height, height, sam.rel_pos_h)  # H x H x d
    rel_cols = get_rel_pos(width, width, sam.rel_pos_w)  # W x W x d
    grid_q = q.reshape(batch, heads, height, width, head_dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_rows).reshape(batch, heads, tokens, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_cols).reshape(batch, heads, tokens, width)
    out = relpos_attention_reference(q, k, v, rel_h, rel_w, width, sam.scale)  # B x heads x N x d
    out = out.reshape(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)
    got = sam.proj(out.reshape(batch, height, width, dim))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    (got_grad,) = torch.autograd.grad(got, x, upstream)
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-4)
