"""SSA loss: fused Triton kernel (value and gradient) against autograd of the torch reference."""

import pytest
import torch
import torch.nn.functional as F
import triton

import resam_kernels
from resam_kernels import ssa
from resam_kernels.ssa import ssa_forward_triton, ssa_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAU = 0.07


def inputs(num_rows, queue_len, dim, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(num_rows, dim, generator=generator) * 3
    weak = student + torch.randn(num_rows, dim, generator=generator)  # correlated, as in training
    queue = torch.randn(queue_len, dim, generator=generator) * 2
    student = student.to(dtype).to(DEVICE).requires_grad_(True)
    return student, weak.to(dtype).to(DEVICE), queue.to(dtype).to(DEVICE)


def test_reference_matches_explicit_formula():
    student, weak, queue = inputs(4, 6, 5, torch.float64, seed=0)
    expected = 0.0
    for i in range(4):
        s = student[i] / student[i].norm()
        h = weak[i] / weak[i].norm()
        keys = torch.cat([h[None], queue / queue.norm(dim=1, keepdim=True)])  # (q + 1) x C
        w = torch.softmax(keys @ h / TAU, dim=0)
        expected = expected + (w * (1 - keys @ s)).sum() / 4
    torch.testing.assert_close(ssa_loss_reference(student, weak, queue, TAU),
                               expected.float(), atol=1e-5, rtol=1e-5)
    empty = queue[:0]
    torch.testing.assert_close(ssa_loss_reference(student, weak, empty, TAU),
                               (1 - F.cosine_similarity(student, weak)).mean().float())


# q in {0, 1, 128, 1000} (1000 = 7 full 128-row tiles + a partial one), N in {1, 5, 70}
# (70 crosses the 64-row block), C = 256 and an odd 33.
CASES = [
    (1, 0, 33), (5, 1, 256), (70, 128, 33), (5, 1000, 256), (1, 1000, 33), (70, 0, 256),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: "N%d-q%d-C%d" % case)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference_value_and_gradient(case, dtype):
    num_rows, queue_len, dim = case
    student, weak, queue = inputs(num_rows, queue_len, dim, dtype, seed=sum(case))
    assert resam_kernels.runs_triton(student)
    loss = resam_kernels.ssa_loss(student, weak, queue, TAU)
    (grad,) = torch.autograd.grad(loss, student)
    loss_ref = ssa_loss_reference(student, weak, queue, TAU)
    (grad_ref,) = torch.autograd.grad(loss_ref, student)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype
    # Both paths upcast the same values to float32; only summation order differs. The bf16
    # gradient is rounded to bf16 at the end (relative step 2^-8).
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    scale = grad_ref.float().abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(grad, grad_ref, atol=1e-5 * scale, rtol=1e-4)
    else:
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-2 * scale, rtol=1e-2)


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_queue_split_merge(splits):
    """The GPU launch splits the queue over programs; the interpreter must test the merge too."""
    student, weak, queue = inputs(9, 1000, 33, torch.float32, seed=splits)
    loss, grad = ssa_forward_triton(student, weak, queue, TAU, queue_splits=splits)
    loss_ref = ssa_loss_reference(student, weak, queue, TAU)
    (grad_ref,) = torch.autograd.grad(loss_ref, student)
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("use_triton", [True, False])
def test_empty_batch_and_gradient_only_to_student(use_triton):
    student, weak, queue = inputs(0, 5, 33, torch.float32, seed=1)
    loss = resam_kernels.ssa_loss(student, weak, queue, TAU, use_triton=use_triton)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.shape == (0, 33)

    student, weak, queue = inputs(3, 5, 33, torch.float32, seed=2)
    weak.requires_grad_(True)
    queue.requires_grad_(True)
    loss = resam_kernels.ssa_loss(student, weak, queue, TAU, use_triton=use_triton)
    (loss * 2).backward()
    assert weak.grad is None and queue.grad is None
    assert student.grad.abs().sum() > 0
    # the gradient is tangent to the unit sphere at s (it goes through the normalisation)
    radial = (student.grad * student.detach()).sum(dim=1)
    assert radial.abs().max() < 1e-5


@pytest.mark.parametrize("use_triton", [True, False])
def test_no_graph_without_a_student_gradient(use_triton):
    """weak and queue are constants of the loss: when only they want a gradient, or under
    no_grad, the loss has no graph (backward raises) and keeps its value."""
    student, weak, queue = inputs(5, 9, 33, torch.float32, seed=3)
    expected = ssa_loss_reference(student, weak, queue, TAU).detach()
    plain_student = student.detach()
    loss = resam_kernels.ssa_loss(plain_student, weak.requires_grad_(True), queue.requires_grad_(True),
                                  TAU, use_triton=use_triton)
    assert not loss.requires_grad
    with pytest.raises(RuntimeError):
        loss.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        loss = resam_kernels.ssa_loss(student, weak, queue, TAU, use_triton=use_triton)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_second_derivative_matches_the_reference():
    """A Hessian-vector product through the fused loss (create_graph=True) equals the
    reference's, instead of silently leaving out the SSA term."""
    student, weak, queue = inputs(5, 9, 33, torch.float32, seed=4)
    products = []
    for ssa_loss in (resam_kernels.ssa_loss, ssa_loss_reference):
        total = ssa_loss(student, weak, queue, TAU) + 0.5 * (student ** 2).sum()
        (grad,) = torch.autograd.grad(total, student, create_graph=True)
        (hessian_vector,) = torch.autograd.grad(grad.sum(), student)
        products.append(hessian_vector)
    assert (products[1] - 1).abs().max() > 1e-4  # the SSA term has a second derivative
    torch.testing.assert_close(products[0], products[1])


def test_scale_invariance_and_bad_inputs():
    student, weak, queue = inputs(4, 10, 33, torch.float32, seed=4)
    loss = resam_kernels.ssa_loss(student, weak, queue, TAU)
    rescaled = resam_kernels.ssa_loss(student * 5, weak * 0.1, queue * 3, TAU)
    torch.testing.assert_close(loss, rescaled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="queue"):
        resam_kernels.ssa_loss(student, weak, torch.zeros(3, 32, device=DEVICE), TAU)
    with pytest.raises(ValueError, match="student and weak"):
        resam_kernels.ssa_loss(student, weak[:2], queue, TAU)
    with pytest.raises(ValueError, match="tau"):
        resam_kernels.ssa_loss(student, weak, queue, 0.0)


@pytest.mark.parametrize("tau", [0.01, 1.0])
def test_zero_rows_near_duplicates_and_temperatures(tau):
    """The kernel shifts the softmax by the self logit h_i . h_i / tau instead of a running max:
    check rows where that bound is tight (queue copies of h_i) or degenerate (h_i = 0)."""
    student, weak, queue = inputs(6, 200, 33, torch.float32, seed=7)
    weak = weak.clone()
    weak[0] = 0.0  # zero weak row: all logits 0, uniform weights over the zero self key and Q
    queue = queue.clone()
    queue[5] = weak[1] * 3.0  # a queue key equal to h_1 after normalisation
    loss, grad = ssa_forward_triton(student, weak, queue, tau, queue_splits=2)
    loss_ref = ssa_loss_reference(student, weak, queue, tau)
    (grad_ref,) = torch.autograd.grad(loss_ref, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-6, rtol=1e-4)


# Channel split of the partial kernel: (C_PARTS, K_CHUNKS) against the reference. C = 33 pads
# to 64 channels (parts of 16: the last part holds 1 real channel and 3 parts-worth of padding
# at 4 parts), C = 20 pads to 32 (two parts of 16, the second 4 channels wide), C = 256 is the
# model width; q = 129 crosses the 128-row queue tile, N = 65 the 64-row block.
SPLIT_CASES = [
    (1, 0, 33), (1, 1, 33), (65, 129, 33), (5, 1000, 256), (3, 200, 20), (65, 1, 256),
]


@pytest.mark.parametrize("tiles", [(2, 1), (1, 2), (2, 2), (4, 4), (1, 4), (4, 8)],
                         ids=lambda tiles: "parts%d-chunks%d" % tiles)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda case: "N%d-q%d-C%d" % case)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_parts_and_chunks(tiles, case, dtype):
    channel_parts, channel_chunks = tiles
    num_rows, queue_len, dim = case
    if max(tiles) * 16 > max(16, triton.next_power_of_2(dim)):
        pytest.skip("channel tile narrower than 16 (the autotuner prunes it)")
    student, weak, queue = inputs(num_rows, queue_len, dim, dtype, seed=sum(case) + sum(tiles))
    loss, grad = ssa_forward_triton(student, weak, queue, TAU, queue_splits=3,
                                    channel_parts=channel_parts, channel_chunks=channel_chunks)
    loss_ref = ssa_loss_reference(student, weak, queue, TAU)
    (grad_ref,) = torch.autograd.grad(loss_ref, student)
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    scale = grad_ref.float().abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(grad, grad_ref, atol=1e-7, rtol=1e-4)
    else:  # the reference gradient is rounded to bf16 (relative step 2^-8)
        torch.testing.assert_close(grad, grad_ref.float(), atol=1e-2 * scale, rtol=1e-2)
    # the same kernel without the split: only the float32 summation order of h . Q differs
    loss_whole, grad_whole = ssa_forward_triton(student, weak, queue, TAU, queue_splits=3)
    torch.testing.assert_close(loss, loss_whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, grad_whole, atol=1e-6 * scale, rtol=1e-5)


def test_channel_tile_pruning_and_config_counts():
    """The GPU autotuner caps C_PARTS and K_CHUNKS so that no channel tile is under 16 wide."""
    # float32: 12 tf32x3 tiles and 7 SPLIT_BF16 (bf16x3) tiles
    assert len(ssa._PARTIAL_CONFIGS_F32) <= 20 and len(ssa._PARTIAL_CONFIGS_BF16) <= 12
    assert not any(c.kwargs["SPLIT_BF16"] for c in ssa._PARTIAL_CONFIGS_BF16)
    full = ssa._fit_channel_tiles(ssa._PARTIAL_CONFIGS_F32, {}, BLOCK_C=256)
    assert [(c.kwargs, c.num_warps, c.num_stages) for c in full] == [
        (c.kwargs, c.num_warps, c.num_stages) for c in ssa._PARTIAL_CONFIGS_F32]
    for block_c in (16, 32, 64):
        fitted = ssa._fit_channel_tiles(ssa._PARTIAL_CONFIGS_F32, {}, BLOCK_C=block_c)
        tags = [(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in fitted]
        assert len(tags) == len(set(tags)) >= 1
        for config in fitted:
            assert block_c // config.kwargs["C_PARTS"] >= 16
            assert block_c // config.kwargs["K_CHUNKS"] >= 16
    assert {c.kwargs["K_CHUNKS"] for c in ssa._fit_channel_tiles(
        ssa._PARTIAL_CONFIGS_F32, {}, BLOCK_C=16)} == {1}


# SPLIT_BF16 configs (float32 inputs split into bf16 high and low parts, bf16x3 products): the
# interpreter multiplies the bf16 parts exactly in float32, as the tensor cores do. q in
# {0, 1, 128, 129, 200, 1000}, odd N (N = 0 returns before any kernel: see the empty-batch test),
# odd C 33 and 255 besides 20 and 256.
SPLIT_BF16_CASES = [
    (1, 0, 33), (1, 1, 255), (5, 1, 256), (65, 129, 33), (5, 1000, 256), (3, 200, 20),
    (71, 128, 255), (9, 1000, 33),
]


@pytest.mark.parametrize("tiles", [(1, 1), (2, 2), (1, 4), (4, 8)],
                         ids=lambda tiles: "parts%d-chunks%d" % tiles)
@pytest.mark.parametrize("case", SPLIT_BF16_CASES, ids=lambda case: "N%d-q%d-C%d" % case)
def test_split_bf16_matches_reference(tiles, case):
    channel_parts, channel_chunks = tiles
    num_rows, queue_len, dim = case
    if max(tiles) * 16 > max(16, triton.next_power_of_2(dim)):
        pytest.skip("channel tile narrower than 16 (the autotuner prunes it)")
    student, weak, queue = inputs(num_rows, queue_len, dim, torch.float32, seed=sum(case) + 1)
    loss, grad = ssa_forward_triton(student, weak, queue, TAU, queue_splits=3, split_bf16=True,
                                    channel_parts=channel_parts, channel_chunks=channel_chunks)
    loss_ref = ssa_loss_reference(student, weak, queue, TAU)
    (grad_ref,) = torch.autograd.grad(loss_ref, student)
    # the float32 tolerances of the tests above
    torch.testing.assert_close(loss, loss_ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("case", [(5, 1000, 256), (65, 129, 33)],
                         ids=lambda case: "N%d-q%d-C%d" % case)
def test_split_bf16_leaves_bfloat16_inputs_alone(case):
    """SPLIT_BF16 is a float32 switch: bf16 inputs run the bf16 kernel, bit for bit."""
    student, weak, queue = inputs(*case, torch.bfloat16, seed=3)
    loss, grad = ssa_forward_triton(student, weak, queue, TAU, queue_splits=2, split_bf16=True)
    loss_plain, grad_plain = ssa_forward_triton(student, weak, queue, TAU, queue_splits=2)
    assert torch.equal(loss, loss_plain) and torch.equal(grad, grad_plain)


@pytest.mark.parametrize("tau", [0.07, 1.0])
def test_split_bf16_accuracy_with_spread_weights(tau):
    """Queue rows near the weak rows spread the target weights over many keys, so the h . Q
    products matter. Against a float64 reference: bf16x3 keeps the loss within 1e-7 and the
    gradient within 1e-5 of its largest entry (interpreter: 4.7e-6 at tau 0.07, 3.0e-6 at 1.0;
    the interpreter's float32 products and the float32 torch reference about 5e-7)."""
    generator = torch.Generator().manual_seed(3)
    weak = torch.randn(64, 256, generator=generator)
    queue = torch.cat([weak + 0.3 * torch.randn(64, 256, generator=generator) for _ in range(4)]
                      + [torch.randn(256, 256, generator=generator)])
    student = (weak + torch.randn(64, 256, generator=generator)).requires_grad_(True)
    loss, grad = ssa_forward_triton(student, weak, queue, tau, queue_splits=2, split_bf16=True)
    # the specification in float64 (ssa_loss_reference computes in float32)
    student64 = student.detach().double().requires_grad_(True)
    s, h, q = (F.normalize(x, dim=1) for x in (student64, weak.double(), queue.double()))
    weights = torch.softmax(torch.cat([(h * h).sum(1, keepdim=True), h @ q.T], dim=1) / tau, dim=1)
    similarity = torch.cat([(s * h).sum(1, keepdim=True), s @ q.T], dim=1)
    loss64 = (weights * (1 - similarity)).sum(1).mean()
    (grad64,) = torch.autograd.grad(loss64, student64)
    scale = grad64.abs().max().item()
    assert abs(loss.double() - loss64).item() < 1e-7
    assert (grad.double() - grad64).abs().max().item() < 1e-5 * scale
