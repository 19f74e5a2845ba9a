"""Mask losses (focal, dice, IoU): fused Triton kernels against autograd of the torch reference.

Under TRITON_INTERPRET=1 the kernels step 4096 pixels at a time, two steps a program (8192
pixels a chunk), so 63 x 257 = 16191 pixels is one full chunk and a partial one, 257 x 257 =
66049 ends in a chunk whose second step is empty, and 64 x 128 = 8192 is exactly one chunk.
"""

import pytest
import torch

import resam_kernels
from resam_dist.resam.losses import mask_losses
from resam_kernels.mask_loss import mask_loss_terms_reference, mask_loss_terms_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(shape, dtype, seed, scale=4.0):
    """Logits ~ N(0, scale^2) and targets of a random density per instance; with 3 or more
    instances (last-but-two dim) instance 0 has an all-false and instance 1 an all-true target."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=generator) * scale
    density = torch.rand(shape[:-2] + (1, 1), generator=generator)
    target = torch.rand(shape, generator=generator) < density
    if len(shape) >= 3 and shape[-3] >= 3:
        target[..., 0, :, :] = False
        target[..., 1, :, :] = True
    return logits.to(dtype).to(DEVICE).requires_grad_(True), target.to(DEVICE)


def terms_and_gradient(fn, logits, target, seed):
    """(focal, dice, iou) and the gradient of sum(g_f focal + g_d dice) for random g_f, g_d."""
    focal, dice, iou = fn(logits, target)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand((2,) + tuple(focal.shape), generator=generator).to(DEVICE)
    (grad,) = torch.autograd.grad((weights[0] * focal).sum() + (weights[1] * dice).sum(), logits)
    return focal, dice, iou, grad


def assert_matches_reference(logits, target, seed=0):
    focal, dice, iou, grad = terms_and_gradient(mask_loss_terms_triton, logits, target, seed)
    focal_ref, dice_ref, iou_ref, grad_ref = terms_and_gradient(mask_loss_terms_reference, logits, target, seed)
    assert focal.dtype == dice.dtype == iou.dtype == torch.float32
    assert focal.shape == dice.shape == iou.shape == logits.shape[:-2]
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    assert not iou.requires_grad
    # Both compute in float32 from the same upcast values; only the summation order and the
    # exp/log implementations differ.
    torch.testing.assert_close(focal, focal_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(dice, dice_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert torch.equal(iou, iou_ref)  # from exact integer counts
    scale = grad_ref.float().abs().nan_to_num().max().item() if grad_ref.numel() else 0.0
    if logits.dtype == torch.float32:
        torch.testing.assert_close(grad, grad_ref, atol=1e-5 * scale, rtol=1e-4, equal_nan=True)
    else:  # both gradients rounded to bf16 / fp16 at the end: a step or two of 2^-8 / 2^-11
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-2 * scale, rtol=2e-2,
                                   equal_nan=True)


# K in {0, 1, 7}, H and W in {1, 63, 257} and one exact chunk (64 x 128); leading dims B x K.
SHAPES = [(2, 0, 63, 257), (1, 1, 1, 1), (1, 1, 257, 257), (1, 7, 63, 257), (2, 7, 1, 257),
          (1, 7, 257, 1), (1, 7, 64, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(shape, dtype):
    logits, target = make_inputs(shape, dtype, seed=sum(shape))
    assert resam_kernels.runs_triton(logits)
    assert_matches_reference(logits, target, seed=len(shape))


@pytest.mark.parametrize("magnitude", [30.0, 100.0])
def test_large_magnitude_logits(magnitude):
    """|x| = 30 and 100 on both sides of the target: exp(-|x|) is tiny or a float32 denormal."""
    logits, target = make_inputs((1, 7, 63, 65), torch.float32, seed=int(magnitude))
    sign = torch.where(torch.rand(logits.shape, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    logits = (sign.to(DEVICE) * magnitude).requires_grad_(True)
    focal, dice, _, grad = terms_and_gradient(mask_loss_terms_triton, logits, target, seed=3)
    assert torch.isfinite(focal).all() and torch.isfinite(dice).all() and torch.isfinite(grad).all()
    assert_matches_reference(logits, target, seed=3)


def test_fp16_and_non_contiguous_inputs():
    logits, target = make_inputs((1, 7, 63, 257), torch.float16, seed=5)
    assert_matches_reference(logits, target)
    base, base_target = make_inputs((2, 7, 257, 63), torch.float32, seed=6)
    transposed = base.transpose(-1, -2)  # 2 x 7 x 63 x 257, not contiguous
    assert not transposed.is_contiguous()
    assert_matches_reference(transposed, base_target.transpose(-1, -2))
    assert_matches_reference(base[:, 1::2, 3:], base_target[:, 1::2, 3:])


def test_empty_inputs():
    for shape in [(0, 63, 257), (3, 0, 5), (3, 5, 0)]:  # no instance, H = 0, W = 0
        logits, target = make_inputs(shape, torch.float32, seed=2)
        focal, dice, iou = mask_loss_terms_triton(logits, target)
        focal_ref, dice_ref, iou_ref = mask_loss_terms_reference(logits, target)
        torch.testing.assert_close(focal, focal_ref, equal_nan=True)  # H W = 0: NaN (empty mean)
        torch.testing.assert_close(dice, dice_ref)  # H W = 0: 1 - 1 / 1 = 0
        assert torch.equal(iou, iou_ref)  # H W = 0: 1
        (focal + dice).sum().backward()
        assert logits.grad.shape == logits.shape


def test_non_finite_logits_behave_like_the_reference():
    """NaN: that instance's focal and dice are NaN, its IoU counts NaN as "not > 0"; +-inf: the
    values match the reference (0 on the target's side, +inf focal on the wrong side)."""
    logits, target = make_inputs((1, 7, 63, 65), torch.float32, seed=9)
    with torch.no_grad():
        logits[0, 2, 5, 7] = float("nan")
        logits[0, 3, 0, 0] = float("inf") if target[0, 3, 0, 0] else float("-inf")  # right side
        logits[0, 4, 1, 1] = float("-inf") if target[0, 4, 1, 1] else float("inf")  # wrong side
    focal, dice, iou = mask_loss_terms_triton(logits, target)
    focal_ref, dice_ref, iou_ref = mask_loss_terms_reference(logits, target)
    torch.testing.assert_close(focal, focal_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(dice, dice_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert torch.equal(iou, iou_ref)
    assert focal[0, 2].isnan() and dice[0, 2].isnan() and focal[0, 4] == float("inf")
    assert torch.isfinite(focal[0, 3]) and torch.isfinite(torch.cat([focal[0, :2], focal[0, 5:]])).all()


def test_backward_saves_only_logits_target_and_per_instance_values():
    logits, target = make_inputs((2, 7, 63, 257), torch.float32, seed=4)
    for fn, fused in ((mask_loss_terms_triton, True), (mask_loss_terms_reference, False)):
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            focal, dice, _ = fn(logits, target)
        input_bytes = logits.numel() * 4 + target.numel()
        if fused:
            assert sum(saved) <= input_bytes + 2 * 14 * 4
        else:  # the reference keeps full-size float32 intermediates: what the kernel avoids
            assert sum(saved) > 2 * input_bytes


def test_dispatcher_and_mask_losses_agree_with_the_reference_path():
    logits, target = make_inputs((2, 7, 63, 65), torch.float32, seed=8)
    reference = resam_kernels.mask_loss_terms(logits, target, use_triton=False)
    fused = resam_kernels.mask_loss_terms(logits, target)
    for value, expected in zip(fused, reference):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)
    valid = torch.tensor([[True] * 7, [True, False, True, True, False, False, True]], device=DEVICE)
    pred_iou = torch.rand(2, 7, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_(True)
    expected = mask_losses(logits, pred_iou, target, valid, use_kernels=False)
    expected_grads = torch.autograd.grad(sum(expected), (logits, pred_iou))
    for recompute in (False, True):
        got = mask_losses(logits, pred_iou, target, valid, recompute=recompute, use_kernels=True)
        for value, reference_value in zip(got, expected):
            torch.testing.assert_close(value, reference_value, atol=1e-6, rtol=1e-5)
        grads = torch.autograd.grad(sum(got), (logits, pred_iou))
        torch.testing.assert_close(grads[0], expected_grads[0], atol=1e-9, rtol=1e-4)
        torch.testing.assert_close(grads[1], expected_grads[1], atol=1e-6, rtol=1e-5)
    zeros = mask_losses(logits, pred_iou, target, torch.zeros_like(valid), use_kernels=True)
    assert all(value.item() == 0.0 and value.requires_grad for value in zeros)


def test_masks_of_2_to_the_30_pixels_are_refused():
    """Pixel offsets inside one mask are int32 in the kernels (expanded views: nothing allocated)."""
    logits = torch.zeros(1, 1, 1, device=DEVICE).expand(2, 1 << 15, 1 << 15)
    target = torch.zeros(1, 1, 1, dtype=torch.bool, device=DEVICE).expand(2, 1 << 15, 1 << 15)
    with pytest.raises(ValueError, match="pixels"):
        mask_loss_terms_triton(logits, target)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 2 x 256 pixels and a finalize of 4 instances x 4 chunks a step: 63 x 41 = 2583
    pixels are 6 chunks (the last one partial), so a finalize program takes a full and a partial
    step, and 7 instances are a full and a partial finalize program."""
    from resam_kernels import mask_loss as module

    for name, value in (("_INTERPRET_BLOCK", 256), ("_INTERPRET_ITERS", 2), ("_FINALIZE_BLOCK_N", 4),
                        ("_FINALIZE_BLOCK_C", 4)):
        monkeypatch.setattr(module, name, value)


@pytest.mark.parametrize("shape", [(1, 7, 63, 41), (2, 3, 17, 30), (1, 1, 1, 1)],
                         ids=lambda shape: "x".join(map(str, shape)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finalize_over_several_chunks_and_instance_blocks(small_chunks, shape, dtype):
    logits, target = make_inputs(shape, dtype, seed=sum(shape) + 1)
    assert_matches_reference(logits, target, seed=7)


def test_one_unused_output_and_strided_upstream_gradients(small_chunks):
    """Only focal or only dice in the loss: the other's gradient is None in the backward (read as a
    compile-time 0, nothing allocated). The upstream gradients arrive broadcast (stride 0, from a
    sum) or transposed (copied to N elements)."""
    logits, target = make_inputs((3, 5, 63, 41), torch.float32, seed=21)
    weights = torch.rand(5, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    losses = {"focal only": lambda focal, dice: focal.sum(),
              "dice only": lambda focal, dice: (weights * dice.t()).sum(),
              "both, strided": lambda focal, dice: focal.sum() + (weights * dice.t()).sum()}
    for name, loss in losses.items():
        grads = []
        for fn in (mask_loss_terms_triton, mask_loss_terms_reference):
            focal, dice, _ = fn(logits, target)
            grads.append(torch.autograd.grad(loss(focal, dice), logits)[0])
        scale = grads[1].abs().max().item()
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_dice_only_gradient_at_an_infinite_logit_is_finite():
    """Without focal in the loss, its derivative (NaN at an infinite logit on the wrong side of
    the target) is not formed: the dice-only gradient there is 0, as in the reference."""
    logits = torch.tensor([[[float("inf"), 0.5, -float("inf")]]], device=DEVICE, requires_grad=True)
    target = torch.tensor([[[False, True, True]]], device=DEVICE)
    grads = []
    for fn in (mask_loss_terms_triton, mask_loss_terms_reference):
        _, dice, _ = fn(logits, target)
        grads.append(torch.autograd.grad(dice.sum(), logits)[0])
    assert grads[0].isfinite().all() and grads[0][0, 0, 0] == 0
    torch.testing.assert_close(grads[0], grads[1])


def test_empty_inputs_with_one_unused_output():
    """N = 0 and H W = 0 launch no backward program: an empty gradient of the logits' shape."""
    for shape in [(0, 63, 257), (3, 0, 5), (3, 5, 0)]:
        logits, target = make_inputs(shape, torch.float32, seed=2)
        for pick in (0, 1):
            terms = mask_loss_terms_triton(logits, target)
            (grad,) = torch.autograd.grad(terms[pick].nan_to_num().sum(), logits)
            assert grad.shape == logits.shape and grad.numel() == 0


def test_nan_logits_gradient_matches_the_reference(small_chunks):
    """A NaN logit makes its instance's dice NaN, so that instance's whole gradient is NaN (in the
    reference too); the other instances' gradients are unaffected."""
    logits, target = make_inputs((1, 7, 63, 41), torch.float32, seed=23)
    with torch.no_grad():
        logits[0, 2, 40, 7] = float("nan")  # chunk 5 of 6
    focal, dice, iou, grad = terms_and_gradient(mask_loss_terms_triton, logits, target, seed=4)
    focal_ref, dice_ref, iou_ref, grad_ref = terms_and_gradient(mask_loss_terms_reference, logits, target, seed=4)
    assert focal[0, 2].isnan() and dice[0, 2].isnan() and grad[0, 2].isnan().all()
    assert torch.equal(iou, iou_ref)
    torch.testing.assert_close(focal, focal_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(dice, dice_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    scale = grad_ref.nan_to_num().abs().max().item()
    torch.testing.assert_close(grad, grad_ref, atol=1e-5 * scale, rtol=1e-4, equal_nan=True)


def test_outputs_are_contiguous_and_iou_may_change_in_place():
    """Changing the IoU in place (it has no gradient) leaves the backward intact, as with the
    reference: its buffer is shared with neither focal and dice nor the saved I, D."""
    logits, target = make_inputs((2, 7, 17, 30), torch.float32, seed=24)
    focal, dice, iou = mask_loss_terms_triton(logits, target)
    assert focal.is_contiguous() and dice.is_contiguous() and iou.is_contiguous()
    iou.mul_(2.0)
    (grad,) = torch.autograd.grad((focal + dice).sum(), logits)
    (grad_ref,) = torch.autograd.grad(sum(mask_loss_terms_reference(logits, target)[:2]).sum(), logits)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5 * grad_ref.abs().max().item(), rtol=1e-4)
