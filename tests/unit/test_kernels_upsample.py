"""The Triton 4x bilinear upsampling against its reference (F.interpolate and its autograd), under
TRITON_INTERPRET=1 on CPU."""

import pytest
import torch

import resam_kernels
from resam_kernels.upsample import upsample4x_reference, upsample4x_triton

pytestmark = pytest.mark.skipif(not resam_kernels.runs_triton(torch.zeros(1)),
                                reason="needs TRITON_INTERPRET=1 (the kernels run on CPU tensors through the interpreter)")


# odd sizes, single pixels, a width past one forward tile (4 * 65 > 256) and one backward tile (65 > 64)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 3), (1, 1, 2, 2), (2, 1, 3, 7), (1, 2, 17, 16),
                                   (1, 1, 5, 1), (0, 1, 4, 4), (1, 1, 18, 65)])
def test_values_and_gradient_match_interpolate(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    low_res = torch.randn(shape, generator=generator) * 10
    reference_input = low_res.clone().requires_grad_(True)
    expected = upsample4x_reference(reference_input)
    grad_out = torch.randn(expected.shape, generator=generator)
    expected_grad, = torch.autograd.grad(expected, reference_input, grad_out)
    triton_input = low_res.clone().requires_grad_(True)
    got = upsample4x_triton(triton_input)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-6)  # fused multiply-adds may round differently
    got_grad, = torch.autograd.grad(got, triton_input, grad_out)
    assert got_grad.shape == low_res.shape
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_non_contiguous_input_and_dispatcher():
    low_res = torch.randn(3, 2, 9, 6).transpose(2, 3)  # 3 x 2 x 6 x 9, non-contiguous
    torch.testing.assert_close(resam_kernels.upsample4x(low_res), upsample4x_reference(low_res), atol=1e-5, rtol=1e-6)
    assert torch.equal(resam_kernels.upsample4x(low_res, use_triton=False), upsample4x_reference(low_res))


def test_bad_input():
    with pytest.raises(ValueError, match="float32"):
        upsample4x_triton(torch.randn(1, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32"):
        upsample4x_triton(torch.randn(4, 4))
