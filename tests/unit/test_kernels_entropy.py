"""Entropy filter: Triton kernel (interpreter on CPU, real on CUDA) against the torch reference."""

import math

import pytest
import torch

import resam_kernels
from resam_kernels.entropy import confidence_reference, entropy_filter_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Every K in {0, 1, 7, 50} and every H, W in {1, 63, 256, 257} appears; the 2048/65536-element
# block boundaries are crossed by the larger shapes (numel not a multiple of the block).
SHAPES = [
    (1, 0, 63, 257),
    (2, 1, 1, 1),
    (1, 7, 257, 256),
    (2, 7, 63, 1),
    (1, 50, 63, 63),
    (1, 50, 257, 257),
    (1, 1, 256, 257),
]


def test_reference_matches_hand_formula():
    logits = torch.tensor([0.0, 3.0, -3.0, 30.0, -30.0])  # c: 0, 0.69, 0.03, ~1, ~0
    p = torch.sigmoid(logits).clamp(1e-6, 1 - 1e-6)
    expected = []
    for value in p.tolist():
        entropy = -(value * math.log(value) + (1 - value) * math.log(1 - value)) / math.log(2)
        expected.append(value * (1 - entropy))
    torch.testing.assert_close(confidence_reference(logits), torch.tensor(expected))
    # p = 0.5 has entropy 1: zero confidence; saturated logits hit the clamp, no NaN.
    assert confidence_reference(torch.tensor([0.0])).item() == 0.0
    assert torch.isfinite(confidence_reference(torch.tensor([1e4, -1e4]))).all()
    keep = entropy_filter_reference(logits.view(1, 1, 1, 5), 0.5).flatten().tolist()
    assert keep == [False, True, False, True, False]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.2, 0.5])
def test_triton_matches_reference(shape, dtype, eps):
    generator = torch.Generator().manual_seed(hash((shape, eps)) % 2**31)
    logits = (torch.randn(shape, generator=generator) * 6).to(dtype).to(DEVICE)
    assert resam_kernels.runs_triton(logits)
    keep, confidence = resam_kernels.entropy_filter(logits, eps, return_confidence=True)
    keep_ref, confidence_ref = entropy_filter_reference(logits, eps, return_confidence=True)
    assert keep.dtype == torch.bool and keep.shape == logits.shape
    assert confidence.dtype == torch.float32 and confidence.shape == logits.shape
    # Both paths compute in float32 from the same input values: differences are rounding only.
    torch.testing.assert_close(confidence, confidence_ref, atol=2e-6, rtol=1e-5)
    disagree = keep != keep_ref
    assert not (disagree & ((confidence_ref - eps).abs() > 1e-5)).any()
    assert torch.equal(resam_kernels.entropy_filter(logits, eps), keep)


def test_confidence_dispatcher_and_reference_switch():
    logits = torch.randn(1, 3, 5, 7, device=DEVICE)
    torch.testing.assert_close(resam_kernels.confidence(logits), confidence_reference(logits),
                               atol=2e-6, rtol=1e-5)
    assert not resam_kernels.runs_triton(logits, use_triton=False)
    keep = resam_kernels.entropy_filter(logits, 0.2, use_triton=False)
    assert torch.equal(keep, entropy_filter_reference(logits, 0.2))


def test_triton_special_values_match_reference():
    # NaN stays NaN (not kept); infinities, huge logits and |logit| around the clamp point
    # ln((1 - 1e-6) / 1e-6) = 13.8155 take the reference's clamped values; 0 gives exactly 0.
    clamp = math.log((1 - 1e-6) / 1e-6)
    values = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e30, -1e30,
              clamp - 1e-3, clamp, clamp + 1e-3, -clamp + 1e-3, -clamp, -clamp - 1e-3, 1e-8, -1e-8]
    logits = torch.tensor(values, device=DEVICE).view(1, 1, 1, -1)
    keep, confidence = resam_kernels.entropy_filter(logits, 0.5, return_confidence=True)
    keep_ref, confidence_ref = entropy_filter_reference(logits, 0.5, return_confidence=True)
    torch.testing.assert_close(confidence, confidence_ref, atol=2e-6, rtol=1e-5, equal_nan=True)
    assert torch.equal(keep, keep_ref)
    assert confidence[0, 0, 0, 3].item() == 0.0 and confidence[0, 0, 0, 4].item() == 0.0


def test_triton_close_to_float64_formula():
    # The kernel's one-exp/one-log form against the specification evaluated in float64, on a dense
    # grid that crosses the clamp point on both sides.
    logits = torch.linspace(-20, 20, 400_001, device=DEVICE)
    confidence = resam_kernels.confidence(logits)
    p = torch.sigmoid(logits.double()).clamp(1e-6, 1 - 1e-6)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)
    exact = p * (1 - entropy)
    assert (confidence.double() - exact).abs().max().item() < 1e-6
