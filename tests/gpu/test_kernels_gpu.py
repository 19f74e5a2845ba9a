"""Triton kernels on a real CUDA device at training sizes, against the torch references."""

import pytest
import torch

import resam_kernels
from resam_dist.resam.prompts import masks_to_boxes
from resam_kernels.entropy import entropy_filter_reference
from resam_kernels.mask_head import mask_head_reference
from resam_kernels.mask_loss import mask_loss_terms_reference
from resam_kernels.overlap import suppress_overlap_reference
from resam_kernels.ssa import ssa_loss_reference

pytestmark = pytest.mark.gpu

DEVICE = "cuda"


def smooth_logits(batch, num_instances, size, dtype, seed):
    """Blob-like mask logits: upsampled low-resolution noise, so instances overlap in regions."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    coarse = torch.randn(batch, num_instances, size // 32, size // 32, device=DEVICE,
                         generator=generator) * 8 - 4
    logits = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")
    return logits.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", [256, 1024])
def test_entropy_filter_realistic(dtype, size):
    logits = smooth_logits(2, 50, size, dtype, seed=size)
    keep, confidence = resam_kernels.entropy_filter(logits, 0.5, return_confidence=True)
    keep_ref, confidence_ref = entropy_filter_reference(logits, 0.5, return_confidence=True)
    # GPU transcendental functions differ from torch's in the last bits
    torch.testing.assert_close(confidence, confidence_ref, atol=1e-5, rtol=1e-5)
    disagree = keep != keep_ref
    assert not (disagree & ((confidence_ref - 0.5).abs() > 1e-4)).any()
    assert keep.any() and not keep.all()


@pytest.mark.parametrize("mode", ["drop", "argmax"])
@pytest.mark.parametrize("size", [250, 256, 1024])  # 250: rows not a multiple of 4 (byte kernel in "drop")
def test_suppress_overlap_realistic(mode, size):
    logits = smooth_logits(2, 50, size, torch.float32, seed=size + 1)
    keep, confidence = entropy_filter_reference(logits, 0.2, return_confidence=True)
    counts = torch.tensor([50, 31], device=DEVICE)
    out, boxes = resam_kernels.suppress_overlap(keep, confidence, counts, mode)
    out_ref, boxes_ref = suppress_overlap_reference(keep, confidence, counts, mode)
    assert (keep.sum(dim=1) > 1).any()  # the case really has overlaps
    assert torch.equal(out, out_ref)
    assert torch.equal(boxes, boxes_ref)
    assert torch.equal(boxes, masks_to_boxes(out))



def test_suppress_overlap_64bit_offsets():
    """1 x 36 x 8192 x 8192 masks (2.4e9 elements): the later instance planes start beyond 2^31."""
    num_instances, size = 36, 8192
    masks = torch.zeros(1, num_instances, size, size, dtype=torch.bool, device=DEVICE)
    for k in range(num_instances):  # rectangles, each overlapping the next one
        masks[0, k, 100 * k:100 * k + 300, 7000 - 150 * k:7200 - 150 * k] = True
    counts = torch.tensor([num_instances - 1], device=DEVICE)
    out, boxes = resam_kernels.suppress_overlap(masks, None, counts, "drop")
    out_ref, boxes_ref = suppress_overlap_reference(masks, None, counts, "drop")
    assert torch.equal(out, out_ref)
    assert torch.equal(boxes, boxes_ref)
    # instance 34 loses rows 3400-3599 x cols 2050-2099 to instance 33; 35 is padding
    assert boxes[0, num_instances - 2].tolist() == [1900.0, 3400.0, 2100.0, 3700.0]
    assert not out[0, num_instances - 1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("queue_len", [0, 128, 8192, 65536])
def test_ssa_loss_realistic(dtype, queue_len):
    generator = torch.Generator(device=DEVICE).manual_seed(queue_len)
    student = torch.randn(400, 256, device=DEVICE, generator=generator)
    weak = (student + 0.5 * torch.randn(400, 256, device=DEVICE, generator=generator)).to(dtype)
    queue = torch.randn(queue_len, 256, device=DEVICE, generator=generator).to(dtype)
    student = student.to(dtype).requires_grad_(True)
    loss = resam_kernels.ssa_loss(student, weak, queue, 0.07)
    (grad,) = torch.autograd.grad(loss, student)
    loss_ref = ssa_loss_reference(student, weak, queue, 0.07)
    (grad_ref,) = torch.autograd.grad(loss_ref, student)
    # fp32 dots run as tf32x3 on tensor cores (about fp32 accuracy); bf16 inputs are exact in it
    torch.testing.assert_close(loss, loss_ref, atol=1e-4, rtol=1e-4)
    scale = grad_ref.float().abs().max().item()
    tolerance = 1e-3 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=tolerance * scale,
                               rtol=tolerance)


def mask_terms_and_gradient(fn, logits, target):
    """(focal, dice, iou) and d(sum focal + 2 sum dice)/d logits."""
    focal, dice, iou = fn(logits, target)
    (grad,) = torch.autograd.grad(focal.sum() + 2.0 * dice.sum(), logits)
    return focal, dice, iou, grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_loss_terms_realistic(dtype):
    """4 images x 50 instances at 1024 x 1024 (the ViT-B training step), blob-like targets."""
    logits = smooth_logits(4, 50, 1024, dtype, seed=3).requires_grad_(True)
    target = smooth_logits(4, 50, 1024, torch.float32, seed=4) > 0
    target[0, 0] = False  # an empty target and a full one
    target[0, 1] = True
    focal, dice, iou, grad = mask_terms_and_gradient(resam_kernels.mask_loss_terms, logits, target)
    focal_ref, dice_ref, iou_ref, grad_ref = mask_terms_and_gradient(mask_loss_terms_reference, logits, target)
    # float32 sums of 2^20 pixels in another order, GPU exp2/log2 against torch's exp/log1p
    torch.testing.assert_close(focal, focal_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dice, dice_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(iou, iou_ref)
    assert grad.dtype == dtype
    scale = grad_ref.float().abs().max().item()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(grad.float(), grad_ref.float(), atol=tolerance * scale, rtol=tolerance)


def test_mask_loss_terms_64bit_offsets():
    """2100 instances of 1024 x 1024 (2.2e9 pixels, bf16): the last planes start beyond 2^31."""
    num_instances = 2100
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    logits = (torch.randn(num_instances, 1024, 1024, device=DEVICE, generator=generator,
                          dtype=torch.bfloat16) * 4).requires_grad_(True)
    target = torch.zeros(num_instances, 1024, 1024, dtype=torch.bool, device=DEVICE)
    target[-3:, 100:700, 200:900] = True
    focal, dice, iou, grad = mask_terms_and_gradient(resam_kernels.mask_loss_terms, logits, target)
    tail = logits.detach()[-3:].clone().requires_grad_(True)  # the reference on the last planes only
    focal_ref, dice_ref, iou_ref, grad_ref = mask_terms_and_gradient(mask_loss_terms_reference, tail,
                                                                     target[-3:])
    torch.testing.assert_close(focal[-3:], focal_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dice[-3:], dice_ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(iou[-3:], iou_ref)
    scale = grad_ref.float().abs().max().item()
    torch.testing.assert_close(grad[-3:].float(), grad_ref.float(), atol=1e-2 * scale, rtol=1e-2)


def mask_head_inputs(num, c_in, c_out, size, dtype, seed):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    upscaled = torch.randn(num, size, size, c_in, device=DEVICE, generator=generator).permute(0, 3, 1, 2)  # channels-last
    weight = torch.randn(c_in, c_out, 2, 2, device=DEVICE, generator=generator) / c_in ** 0.5
    bias = torch.randn(c_out, device=DEVICE, generator=generator)
    hyper_in = torch.randn(num, c_out, device=DEVICE, generator=generator)
    return [tensor.to(dtype).requires_grad_(True) for tensor in (upscaled, weight, bias, hyper_in)]


def mask_head_and_gradients(fn, inputs, grad_masks):
    masks = fn(*inputs)
    return masks, torch.autograd.grad(masks, inputs, grad_masks)


def test_mask_head_realistic():
    """The decoder's last stage in a ViT-B step: 200 prompts, 64 -> 32 channels, 128 x 128 -> 256 x 256, bf16."""
    inputs = mask_head_inputs(200, 64, 32, 128, torch.bfloat16, seed=6)
    assert inputs[0].is_contiguous(memory_format=torch.channels_last)
    grad_masks = torch.randn(200, 1, 256, 256, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(7))
    masks, grads = mask_head_and_gradients(resam_kernels.mask_head, inputs, grad_masks)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # a float32 reference, not TF32
        masks_ref, grads_ref = mask_head_and_gradients(mask_head_reference, inputs, grad_masks)
    assert masks.dtype == torch.float32
    # float32 on both sides from the same bf16 values: summation order and the GPU erf differ
    scale = masks_ref.abs().max().item()
    torch.testing.assert_close(masks, masks_ref, atol=1e-4 * scale, rtol=1e-3)
    for name, grad, grad_ref, tensor in zip(("upscaled", "weight", "bias", "hyper_in"), grads, grads_ref, inputs):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, name
        # d(pre-activation) rounded to bf16 for the products with upscaled and weight, like torch's
        # bf16 autograd; bf16 results: a step or two of 2^-8 relative to the largest entry
        scale = grad_ref.float().abs().max().item()
        torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-2 * scale, rtol=2e-2, msg=name)
    _, grads_again = mask_head_and_gradients(resam_kernels.mask_head, inputs, grad_masks)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))  # deterministic: no atomics


def test_kernels_do_not_synchronise_the_host():
    """Refine, SSA, the mask losses and the mask head run inside the training step: no
    device-to-host sync allowed."""
    logits = smooth_logits(2, 50, 256, torch.float32, seed=0)
    counts = torch.tensor([50, 20], device=DEVICE)
    student = torch.randn(40, 256, device=DEVICE, requires_grad=True)
    weak = torch.randn(40, 256, device=DEVICE)
    queue = torch.randn(1000, 256, device=DEVICE)
    mask_logits = logits.clone().requires_grad_(True)
    head_inputs = mask_head_inputs(6, 64, 32, 32, torch.bfloat16, seed=0)

    def run_all():
        keep, confidence = resam_kernels.entropy_filter(logits, 0.5, return_confidence=True)
        for mode in ("drop", "argmax"):
            resam_kernels.suppress_overlap(keep, confidence, counts, mode)
        resam_kernels.ssa_loss(student, weak, queue, 0.07).backward()
        focal, dice, _ = resam_kernels.mask_loss_terms(mask_logits, keep)
        (focal.sum() + dice.sum()).backward()
        resam_kernels.mask_head(*head_inputs).sum().backward()

    run_all()  # first call: compilation and the SSA autotuning may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_all()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() > 0
