"""Mask losses of the 4x upsampled low-res logits: the fused Triton kernels (no full-resolution
logits or gradient) against autograd of the reference (F.interpolate, then the torch mask losses).

Under TRITON_INTERPRET=1 these tests give the kernels tiles of 16 x 16 low-res pixels (the
interpreter's default is 64 x 64): h = w = 16 is exactly one tile, h = 17 spans two (rows
16 .. 67 of the full-res target in the second), w = 37 spans three tiles along a row, and 1, 2
and 5 exercise the clamped borders (h = 1: every full-res row samples the one low-res row).
"""

import sys

import pytest
import torch

import resam_kernels
from resam_kernels.mask_loss_upsampled import (check_upsampled_inputs, upsampled_mask_loss_terms_reference,
                                               upsampled_mask_loss_terms_triton)

pytestmark = pytest.mark.skipif(not resam_kernels.runs_triton(torch.zeros(1)),
                                reason="needs TRITON_INTERPRET=1 (the kernels run on CPU tensors through the interpreter)")


@pytest.fixture(autouse=True)
def tiles_of_16(monkeypatch):
    module = sys.modules["resam_kernels.mask_loss_upsampled"]
    monkeypatch.setattr(module, "_INTERPRET_BLOCK_I", 16)
    monkeypatch.setattr(module, "_INTERPRET_BLOCK_J", 16)


def test_default_interpreter_tiles_match_too():
    """The interpreter's default 64 x 64 tiles (one program per plane up to 64 x 64)."""
    module = sys.modules["resam_kernels.mask_loss_upsampled"]
    module_defaults = (64, 64)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "_INTERPRET_BLOCK_I", module_defaults[0])
        patch.setattr(module, "_INTERPRET_BLOCK_J", module_defaults[1])
        low_res, target = make_inputs((3,), 17, 9, seed=11)
        assert_matches_reference(low_res, target)


def make_inputs(lead, height, width, seed, scale=4.0):
    """Low-res logits lead x h x w ~ N(0, scale^2) with about 1 in 8 set to exactly 0, and a
    target lead x 4h x 4w of a random density per instance; with 3 or more instances (last
    leading dim) instance 0 has an all-false and instance 1 an all-true target."""
    generator = torch.Generator().manual_seed(seed)
    low_res = torch.randn(lead + (height, width), generator=generator) * scale
    low_res[torch.rand(low_res.shape, generator=generator) < 0.125] = 0.0
    density = torch.rand(lead + (1, 1), generator=generator)
    target = torch.rand(lead + (4 * height, 4 * width), generator=generator) < density
    if lead and lead[-1] >= 3:
        target[..., 0, :, :] = False
        target[..., 1, :, :] = True
    return low_res.requires_grad_(True), target


def terms_and_gradient(fn, low_res, target, seed):
    """(focal, dice, iou) and the gradient of sum(g_f focal + g_d dice) wrt low_res for random
    upstream g_f, g_d."""
    focal, dice, iou = fn(low_res, target)
    generator = torch.Generator().manual_seed(seed)
    weights = torch.rand((2,) + tuple(focal.shape), generator=generator)
    (grad,) = torch.autograd.grad((weights[0] * focal).sum() + (weights[1] * dice).sum(), low_res)
    return focal, dice, iou, grad


def assert_matches_reference(low_res, target, seed=0):
    focal, dice, iou, grad = terms_and_gradient(upsampled_mask_loss_terms_triton, low_res, target, seed)
    focal_ref, dice_ref, iou_ref, grad_ref = terms_and_gradient(upsampled_mask_loss_terms_reference, low_res,
                                                                target, seed)
    assert focal.dtype == dice.dtype == iou.dtype == grad.dtype == torch.float32
    assert focal.shape == dice.shape == iou.shape == low_res.shape[:-2]
    assert grad.shape == low_res.shape and not iou.requires_grad
    # float32 throughout; the sums run in another order, exp2/log2 replace exp/log1p, and the
    # kernels interpolate with their own (unfused on CPU) multiply-adds
    torch.testing.assert_close(focal, focal_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(dice, dice_ref, atol=1e-6, rtol=1e-5, equal_nan=True)
    assert torch.equal(iou, iou_ref)  # exact counts of the same interpolated signs
    scale = grad_ref.abs().max().item() if grad_ref.numel() else 0.0
    torch.testing.assert_close(grad, grad_ref, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("num", [0, 1, 7])
@pytest.mark.parametrize("height,width", [(1, 1), (2, 2), (5, 5), (16, 16), (17, 9), (9, 37)])
def test_triton_matches_reference(num, height, width):
    low_res, target = make_inputs((num,), height, width, seed=100 * num + 10 * height + width)
    assert resam_kernels.runs_triton(low_res)
    assert_matches_reference(low_res, target, seed=num)


def test_large_magnitude_logits_and_zeros():
    """|x| = 30 with random signs, some exact zeros, and a low-res row of zeros: the interpolated
    logits run from -30 to 30 through 0 (exp(-30) ~ 1e-13)."""
    low_res, target = make_inputs((3,), 9, 13, seed=7)
    generator = torch.Generator().manual_seed(8)
    sign = torch.where(torch.rand(low_res.shape, generator=generator) < 0.5, -30.0, 30.0)
    with torch.no_grad():
        big = torch.where(low_res == 0, 0.0, sign)
        big[:, 4] = 0.0
    big.requires_grad_(True)
    focal, dice, _, grad = terms_and_gradient(upsampled_mask_loss_terms_triton, big, target, seed=3)
    assert torch.isfinite(focal).all() and torch.isfinite(dice).all() and torch.isfinite(grad).all()
    assert_matches_reference(big, target, seed=3)


def test_leading_dims_and_non_contiguous_input():
    low_res, target = make_inputs((2, 3), 5, 7, seed=11)  # B x K x h x w
    assert_matches_reference(low_res, target, seed=1)
    base, base_target = make_inputs((1, 3), 7, 5, seed=12)
    transposed = base.transpose(-1, -2)  # 1 x 3 x 5 x 7, not contiguous
    assert not transposed.is_contiguous()
    assert_matches_reference(transposed, base_target.transpose(-1, -2), seed=2)


def test_empty_inputs():
    for lead, height, width in [((0,), 5, 7), ((2, 0), 3, 3), ((3,), 0, 5), ((3,), 5, 0)]:
        low_res, target = make_inputs(lead, height, width, seed=2)
        focal, dice, iou = upsampled_mask_loss_terms_triton(low_res, target)
        focal_ref, dice_ref, iou_ref = upsampled_mask_loss_terms_reference(low_res, target)
        assert focal.shape == focal_ref.shape == lead
        torch.testing.assert_close(focal, focal_ref, equal_nan=True)  # h w = 0: NaN (empty mean)
        torch.testing.assert_close(dice, dice_ref)  # h w = 0: 1 - 1 / 1 = 0
        assert torch.equal(iou, iou_ref)  # h w = 0: 1
        (grad,) = torch.autograd.grad((focal.nan_to_num() + dice).sum(), low_res)
        assert grad.shape == low_res.shape


def test_backward_saves_no_full_resolution_float_tensor():
    low_res, target = make_inputs((2, 3), 5, 7, seed=4)
    full_res = 20 * 28
    for fn, fused in ((upsampled_mask_loss_terms_triton, True), (upsampled_mask_loss_terms_reference, False)):
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            focal, dice, _ = fn(low_res, target)
        full_res_floats = [tensor for tensor in saved
                           if tensor.is_floating_point() and tensor.numel() >= 6 * full_res]
        if fused:
            assert not full_res_floats
            assert any(tensor is low_res for tensor in saved)
            assert sum(tensor.numel() * tensor.element_size() for tensor in saved) <= (
                low_res.numel() * 4 + target.numel() + 2 * 6 * 4)
        else:  # the reference keeps full-res float32 logits and intermediates: what the kernels avoid
            assert full_res_floats


def test_dispatcher_matches_the_reference_path():
    low_res, target = make_inputs((2, 3), 6, 5, seed=8)
    reference = resam_kernels.upsampled_mask_loss_terms(low_res, target, use_triton=False)
    fused = resam_kernels.upsampled_mask_loss_terms(low_res, target)
    for value, expected in zip(fused, reference):
        torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5)


def test_wrong_shapes_and_dtypes_are_refused():
    low_res, target = make_inputs((2,), 3, 4, seed=0)
    bad = [(low_res.double(), target), (low_res.half(), target), (low_res, target.float()),
           (low_res, target[..., :-1]), (low_res, target.transpose(-1, -2)), (low_res, target[:1]),
           (low_res[0, 0], target[0, 0, :4]), (low_res, target[..., ::4, ::4])]
    for bad_low, bad_target in bad:
        with pytest.raises(ValueError, match="upsampled_mask_loss_terms"):
            check_upsampled_inputs(bad_low, bad_target)
        with pytest.raises(ValueError, match="upsampled_mask_loss_terms"):
            upsampled_mask_loss_terms_triton(bad_low, bad_target)
        with pytest.raises(ValueError, match="upsampled_mask_loss_terms"):
            upsampled_mask_loss_terms_reference(bad_low, bad_target)


def test_masks_of_2_to_the_30_pixels_are_refused():
    """Full-res pixel offsets inside one mask are int32 in the kernels (expanded views: nothing
    allocated)."""
    low_res = torch.zeros(1, 1, 1).expand(2, 1 << 13, 1 << 13)
    target = torch.zeros(1, 1, 1, dtype=torch.bool).expand(2, 1 << 15, 1 << 15)
    with pytest.raises(ValueError, match="pixels"):
        upsampled_mask_loss_terms_triton(low_res, target)


@pytest.fixture
def small_finalize(monkeypatch):
    """`mask_loss`'s finalize over 4 instances x 4 tiles a step: 17 x 37 low-res pixels are 2 x 3
    tiles of 16 x 16 (a full and a partial step), 5 instances a full and a partial program."""
    from resam_kernels import mask_loss

    monkeypatch.setattr(mask_loss, "_FINALIZE_BLOCK_N", 4)
    monkeypatch.setattr(mask_loss, "_FINALIZE_BLOCK_C", 4)


def test_finalize_over_several_tiles_and_instance_blocks(small_finalize):
    low_res, target = make_inputs((5,), 17, 37, seed=31)
    assert_matches_reference(low_res, target, seed=5)


@pytest.mark.parametrize("used", ["focal", "dice"])
def test_one_unused_output(small_finalize, used):
    """The unused output's gradient is None in the backward (a compile-time 0 in the kernel); the
    used one's upstream gradient is broadcast from a sum (stride 0). Empty inputs: an empty
    gradient."""
    for lead, height, width in [((2, 3), 17, 9), ((0,), 5, 7), ((3,), 0, 5)]:
        low_res, target = make_inputs(lead, height, width, seed=32)
        grads = []
        for fn in (upsampled_mask_loss_terms_triton, upsampled_mask_loss_terms_reference):
            focal, dice, _ = fn(low_res, target)
            grads.append(torch.autograd.grad((focal if used == "focal" else dice).nan_to_num().sum(), low_res)[0])
        assert grads[0].shape == low_res.shape
        scale = grads[1].abs().max().item() if grads[1].numel() else 0.0
        torch.testing.assert_close(grads[0], grads[1], atol=1e-5 * scale, rtol=1e-4)


def test_nan_low_res_logit(small_finalize):
    """A NaN low-res logit makes its instance's focal and dice NaN and its whole gradient NaN, in
    the reference too; the other instances are unaffected."""
    low_res, target = make_inputs((2,), 17, 37, seed=33)
    with torch.no_grad():
        low_res[1, 16, 30] = float("nan")  # the last tile
    focal, dice, iou, grad = terms_and_gradient(upsampled_mask_loss_terms_triton, low_res, target, seed=6)
    focal_ref, dice_ref, iou_ref, grad_ref = terms_and_gradient(upsampled_mask_loss_terms_reference, low_res,
                                                                target, seed=6)
    assert focal[1].isnan() and dice[1].isnan() and grad[1].isnan().all() and grad_ref[1].isnan().all()
    assert torch.equal(iou, iou_ref)
    others = [0]
    torch.testing.assert_close(focal[others], focal_ref[others], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dice[others], dice_ref[others], atol=1e-6, rtol=1e-5)
    scale = grad_ref[others].abs().max().item()
    torch.testing.assert_close(grad[others], grad_ref[others], atol=1e-5 * scale, rtol=1e-4)
