"""Mask head (transposed conv + GELU + mask dot product): fused Triton kernels against autograd of
the torch reference.

Under TRITON_INTERPRET=1 the kernels take 32-pixel tiles, two tiles a backward program (64-pixel
chunks): 16 x 16 = 256 pixels is exactly four chunks, 17 x 17 = 289 ends in a partial tile, 5 x 16
= 80 in a chunk whose second tile is empty, and 1 x 1 is a single pixel. Channel counts (64, 32)
are SAM's, (7, 5) pad to the 16-wide dot tiles, (16, 16) is exactly one tile.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

import resam_kernels
from resam_kernels.mask_head import mask_head_reference, mask_head_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SIZES = [(1, 1), (1, 17), (5, 16), (17, 5), (16, 16), (17, 17)]  # H, W in {1, 5, 16, 17}
CHANNELS = [(64, 32), (7, 5), (16, 16)]  # Cin, Cout


def make_inputs(num, c_in, c_out, height, width, dtype, seed, channels_last=True, weight_dtype=None):
    """Pre-activations about N(0, 2) (the GELU's curved part and both tails), all with gradient."""
    generator = torch.Generator().manual_seed(seed)
    upscaled = torch.randn(num, c_in, height, width, generator=generator)
    weight = torch.randn(c_in, c_out, 2, 2, generator=generator) / c_in ** 0.5
    bias = torch.randn(c_out, generator=generator)
    hyper_in = torch.randn(num, c_out, generator=generator)
    upscaled = upscaled.to(dtype).to(DEVICE)
    if channels_last:
        upscaled = upscaled.contiguous(memory_format=torch.channels_last)
    weight_dtype = dtype if weight_dtype is None else weight_dtype
    return [upscaled.requires_grad_(True), weight.to(weight_dtype).to(DEVICE).requires_grad_(True),
            bias.to(weight_dtype).to(DEVICE).requires_grad_(True), hyper_in.to(dtype).to(DEVICE).requires_grad_(True)]


def masks_and_gradients(fn, inputs, seed):
    masks = fn(*inputs)
    generator = torch.Generator().manual_seed(seed)
    grad_masks = torch.randn(masks.shape, generator=generator).to(DEVICE)
    return masks, torch.autograd.grad(masks, inputs, grad_masks)


def assert_matches_reference(inputs, seed=0):
    masks, grads = masks_and_gradients(mask_head_triton, inputs, seed)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # on a GPU: a float32 reference, not TF32
        masks_ref, grads_ref = masks_and_gradients(mask_head_reference, inputs, seed)
    num, _, height, width = inputs[0].shape
    assert masks.dtype == torch.float32 and masks.shape == (num, 1, 2 * height, 2 * width)
    # Both paths compute in float32 from the same values (16-bit products are exact in float32):
    # only the summation order and the erf implementation differ.
    scale = masks_ref.abs().max().item() if masks_ref.numel() else 0.0
    torch.testing.assert_close(masks, masks_ref, atol=1e-5 * scale, rtol=1e-4)
    for name, grad, grad_ref, tensor in zip(("upscaled", "weight", "bias", "hyper_in"), grads, grads_ref, inputs):
        assert grad.dtype == tensor.dtype and grad.shape == tensor.shape, name
        scale = grad_ref.float().abs().max().item() if grad_ref.numel() else 0.0
        if tensor.dtype == torch.float32 and inputs[1].dtype == torch.float32:
            torch.testing.assert_close(grad, grad_ref, atol=1e-5 * scale, rtol=1e-4, msg=name)
        elif name in ("bias", "hyper_in"):
            # float32 sums on both sides, rounded to 16 bits at the end: at most one step (2^-8 in bf16)
            torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-5 * scale, rtol=1e-2, msg=name)
        else:
            # the kernels round d(pre-activation) to bf16 / fp16 for the products with upscaled and
            # weight (as torch's 16-bit autograd does), and 16-bit gradients are rounded at the end:
            # a step or two of 2^-8 (bf16) relative to the largest entry
            torch.testing.assert_close(grad.float(), grad_ref.float(), atol=1e-2 * scale, rtol=2e-2, msg=name)
    grad_upscaled = grads[0]
    if num * height * width > 0:  # returned in channels-last strides
        assert grad_upscaled.is_contiguous(memory_format=torch.channels_last)


def test_reference_matches_explicit_formula():
    upscaled, weight, bias, hyper_in = [t.detach().double() for t in make_inputs(2, 3, 4, 2, 3, torch.float32, seed=1)]
    expected = torch.zeros(2, 1, 4, 6, dtype=torch.float64)
    for n, i, j, a, b in itertools.product(range(2), range(2), range(3), range(2), range(2)):
        pre = upscaled[n, :, i, j] @ weight[:, :, a, b] + bias  # Cout
        expected[n, 0, 2 * i + a, 2 * j + b] = (F.gelu(pre) * hyper_in[n]).sum()
    got = mask_head_reference(upscaled, weight, bias, hyper_in)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: "Cin%d-Cout%d" % c)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "H%d-W%d" % s)
@pytest.mark.parametrize("num", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_matches_reference(dtype, num, size, channels):
    inputs = make_inputs(num, *channels, *size, dtype, seed=num + 7 * sum(size) + sum(channels))
    assert resam_kernels.runs_triton(inputs[0])
    assert_matches_reference(inputs, seed=num)


@pytest.mark.parametrize("channels", CHANNELS, ids=lambda c: "Cin%d-Cout%d" % c)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_empty_inputs(dtype, channels):
    for num, height, width in [(0, 5, 16), (0, 1, 1), (2, 0, 3)]:
        inputs = make_inputs(num, *channels, height, width, dtype, seed=0)
        masks, grads = masks_and_gradients(mask_head_triton, inputs, seed=0)
        assert masks.shape == (num, 1, 2 * height, 2 * width) and masks.dtype == torch.float32
        for grad, tensor in zip(grads, inputs):
            assert grad.shape == tensor.shape and grad.dtype == tensor.dtype
            assert not grad.any()


@pytest.mark.parametrize("size", [(5, 16), (17, 17)], ids=lambda s: "H%d-W%d" % s)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_contiguous_input(dtype, size):
    """Not channels-last: copied to it inside, same results."""
    inputs = make_inputs(3, 64, 32, *size, dtype, seed=5, channels_last=False)
    assert not inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(inputs, seed=5)


def test_float16_and_mixed_dtypes():
    assert_matches_reference(make_inputs(3, 7, 5, 17, 5, torch.float16, seed=2), seed=2)
    # bf16 activations with a float32 weight: computed in float32 throughout
    assert_matches_reference(make_inputs(3, 16, 16, 5, 16, torch.bfloat16, seed=3, weight_dtype=torch.float32), seed=3)


def test_dispatcher():
    inputs = make_inputs(3, 7, 5, 5, 16, torch.float32, seed=4)
    torch.testing.assert_close(resam_kernels.mask_head(*inputs, use_triton=False), mask_head_reference(*inputs))
    torch.testing.assert_close(resam_kernels.mask_head(*inputs), mask_head_reference(*inputs), atol=1e-4, rtol=1e-4)


def test_rejects_bad_shapes():
    upscaled, weight, bias, hyper_in = make_inputs(3, 7, 5, 5, 16, torch.float32, seed=0)
    with pytest.raises(ValueError):
        mask_head_triton(upscaled, weight[:, :, :1], bias, hyper_in)
    with pytest.raises(ValueError):
        mask_head_triton(upscaled, weight, bias[:4], hyper_in)
    with pytest.raises(ValueError):
        mask_head_reference(upscaled, weight, bias, hyper_in[:2])
