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
