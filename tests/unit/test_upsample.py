"""The 4x bilinear upsampling with the closed-form backward against F.interpolate's autograd."""

import pytest
import torch
import torch.nn.functional as F

from resam_dist.model.upsample import upsample4x


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 3), (1, 1, 2, 2), (2, 1, 3, 7), (3, 2, 16, 16),
                                   (1, 1, 5, 1), (0, 1, 4, 4), (2, 1, 64, 64)])
def test_values_and_gradient_match_interpolate(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    low_res = torch.randn(shape, generator=generator, requires_grad=True)
    expected = F.interpolate(low_res, (4 * shape[2], 4 * shape[3]), mode="bilinear", align_corners=False)
    grad_out = torch.randn(expected.shape, generator=generator)
    expected_grad, = torch.autograd.grad(expected, low_res, grad_out)
    copy = low_res.detach().clone().requires_grad_(True)
    got = upsample4x(copy)
    assert torch.equal(got, expected)
    got_grad, = torch.autograd.grad(got, copy, grad_out)
    assert got_grad.shape == low_res.shape and got_grad.is_contiguous()
    torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_without_grad_and_bad_input():
    low_res = torch.randn(2, 1, 3, 5)
    assert torch.equal(upsample4x(low_res), F.interpolate(low_res, (12, 20), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="float32"):
        upsample4x(low_res.double())
    with pytest.raises(ValueError, match="float32"):
        upsample4x(low_res[0])
