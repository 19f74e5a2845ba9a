"""The Triton instance-count kernel against its torch reference (under TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import pytest
import torch

import resam_kernels
from resam_kernels.counts import instance_counts_reference, instance_counts_triton

pytestmark = pytest.mark.skipif(not resam_kernels.runs_triton(torch.zeros(1)),
                                reason="needs TRITON_INTERPRET=1 (the kernels run on CPU tensors through the interpreter)")


def _masks(shape, generator, fraction):
    return torch.rand(shape, generator=generator) < fraction


def _expected(pred_masks, gt):
    """Counts by a route independent of the reference: float64 sums of 0/1 products."""
    p, g = pred_masks.double().flatten(-2), gt.double().flatten(-2)
    return torch.stack([(p * g).sum(-1), (p * (1 - g)).sum(-1), ((1 - p) * g).sum(-1)], dim=-1).long()


@pytest.mark.parametrize("shape", [(1, 0, 5, 5), (1, 1, 1, 1), (2, 7, 63, 63), (1, 3, 257, 256), (3, 1, 64, 128),
                                   (1, 2, 90, 91)])
def test_bool_counts_match_reference(shape):
    # 64 x 128 = 8192 = one interpreter chunk exactly; 90 x 91 = 8190 just under; 257 x 256 several chunks
    generator = torch.Generator().manual_seed(sum(shape))
    pred = _masks(shape, generator, 0.4)
    gt = _masks(shape, generator, 0.3)
    got = instance_counts_triton(pred, gt)
    assert got.dtype == torch.int64 and got.shape == (*shape[:2], 3)
    assert torch.equal(got, instance_counts_reference(pred, gt))
    assert torch.equal(got, _expected(pred, gt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logit_counts_threshold_at_zero_and_treat_nan_as_background(dtype):
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 67, 129, generator=generator).to(dtype)
    logits[0, 0, :3] = 0.0  # exactly 0 is background
    logits[1, 2, 5, 5:40] = float("nan")
    logits[1, 3, 0, :10] = float("inf")
    logits[1, 3, 1, :10] = float("-inf")
    gt = _masks((2, 5, 67, 129), generator, 0.5)
    got = instance_counts_triton(logits, gt)
    assert torch.equal(got, instance_counts_reference(logits, gt))
    foreground = logits.float() > 0  # NaN > 0 is False
    assert torch.equal(got, _expected(foreground, gt))


def test_full_and_empty_masks_and_noncontiguous_input():
    pred = torch.zeros(2, 3, 33, 70, dtype=torch.bool)
    pred[0, 1] = True
    gt = torch.ones(2, 3, 33, 70, dtype=torch.bool)
    got = instance_counts_triton(pred.transpose(2, 3), gt.transpose(2, 3))  # non-contiguous views
    assert got[0, 1].tolist() == [33 * 70, 0, 0]
    assert got[0, 0].tolist() == [0, 0, 33 * 70]
    assert torch.equal(got, instance_counts_reference(pred, gt))


def test_dispatcher_and_bad_inputs():
    generator = torch.Generator().manual_seed(0)
    pred, gt = _masks((1, 4, 20, 21), generator, 0.5), _masks((1, 4, 20, 21), generator, 0.5)
    assert torch.equal(resam_kernels.instance_counts(pred, gt), resam_kernels.instance_counts(pred, gt, use_triton=False))
    with pytest.raises(ValueError, match="same shape"):
        instance_counts_triton(pred, gt[:, :3])
    with pytest.raises(ValueError, match="bool gt"):
        instance_counts_triton(pred, gt.float())
    with pytest.raises(ValueError, match="bool masks or float logits"):
        instance_counts_triton(pred.to(torch.int32), gt)


@pytest.mark.parametrize("shape", [(2, 7, 63, 65), (1, 3, 1, 1), (2, 3, 0, 5), (0, 4, 9, 9)])
def test_many_chunks_add_into_one_row(monkeypatch, shape):
    """Chunks of 2 x 64 pixels: 63 x 65 = 4095 pixels are 32 programs (the last one partial), each
    adding its (tp, fp, fn) to its instance's row with integer atomics; H W = 0 and no instance
    launch nothing and give zeros / an empty result."""
    from resam_kernels import counts as module

    monkeypatch.setattr(module, "_INTERPRET_BLOCK", 64)
    monkeypatch.setattr(module, "_INTERPRET_ITERS", 2)
    generator = torch.Generator().manual_seed(sum(shape))
    logits = torch.randn(shape, generator=generator)
    gt = _masks(shape, generator, 0.4)
    for pred in (logits > 0, logits):
        got = instance_counts_triton(pred, gt)
        assert got.dtype == torch.int64 and got.shape == (*shape[:2], 3) and got.is_contiguous()
        assert torch.equal(got, _expected(logits > 0, gt))
