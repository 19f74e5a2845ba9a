"""The resam_kernels dispatchers refuse inputs on two devices before launching a Triton kernel.

On CPU the second device is PyTorch's "meta" device (tensors with shapes but no memory): the
dispatcher runs Triton (under TRITON_INTERPRET=1) for the CPU tensor it dispatches on and must
refuse the other before any kernel touches it.
"""

import pytest
import torch

import resam_kernels
from resam_kernels.entropy import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 (Triton runs on CPU tensors)")


def _on_meta(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor, device="meta")


def _calls():
    """(dispatcher name, the input moved to the meta device, a call taking the inputs by name)."""
    logits = torch.randn(1, 2, 8, 8)
    masks = logits > 0
    student, weak, queue = torch.randn(3, 16), torch.randn(3, 16), torch.randn(5, 16)
    q = torch.randn(1, 2, 4, 8)  # B heads N d (a 2 x 2 token grid)
    rel_h, rel_w = torch.randn(1, 2, 4, 2), torch.randn(1, 2, 4, 2)
    x, weight, bias = torch.randn(3, 8), torch.randn(8), torch.randn(8)
    upscaled, head_weight, head_bias, hyper_in = (torch.randn(2, 4, 3, 3), torch.randn(4, 8, 2, 2),
                                                  torch.randn(8), torch.randn(2, 8))
    yield ("suppress_overlap", "confidence", dict(masks=masks, confidence=torch.rand(1, 2, 8, 8)),
           lambda t: resam_kernels.suppress_overlap(t["masks"], t["confidence"], torch.tensor([2]), "argmax"))
    yield ("ssa_loss", "queue", dict(student=student, weak=weak, queue=queue),
           lambda t: resam_kernels.ssa_loss(t["student"], t["weak"], t["queue"], 0.1))
    yield ("mask_loss_terms", "target", dict(logits=logits, target=masks),
           lambda t: resam_kernels.mask_loss_terms(t["logits"], t["target"]))
    yield ("upsampled_mask_loss_terms", "target",
           dict(low_res=torch.randn(1, 2, 2, 2), target=torch.zeros(1, 2, 8, 8, dtype=torch.bool)),
           lambda t: resam_kernels.upsampled_mask_loss_terms(t["low_res"], t["target"]))
    yield ("instance_counts", "gt", dict(pred=masks, gt=masks),
           lambda t: resam_kernels.instance_counts(t["pred"], t["gt"]))
    yield ("relpos_attention", "rel_w", dict(q=q, k=q.clone(), v=q.clone(), rel_h=rel_h, rel_w=rel_w),
           lambda t: resam_kernels.relpos_attention(t["q"], t["k"], t["v"], t["rel_h"], t["rel_w"], 2, 0.5))
    yield ("layer_norm", "residual", dict(x=x, weight=weight, bias=bias, residual=x.clone()),
           lambda t: resam_kernels.layer_norm(t["x"], t["weight"], t["bias"], 1e-6, residual=t["residual"]))
    yield ("mask_head", "hyper_in", dict(upscaled=upscaled, weight=head_weight, bias=head_bias, hyper_in=hyper_in),
           lambda t: resam_kernels.mask_head(t["upscaled"], t["weight"], t["bias"], t["hyper_in"]))


@pytest.mark.parametrize("name, moved, tensors, call", list(_calls()), ids=[c[0] for c in _calls()])
def test_an_input_on_another_device_is_refused_by_name(name, moved, tensors, call):
    call(tensors)  # every input on the CPU: runs
    first = next(iter(tensors))
    with pytest.raises(ValueError, match=rf"resam_kernels\.{name}: '{moved}' is on meta but '{first}' is on cpu"):
        call({**tensors, moved: _on_meta(tensors[moved])})


def test_drop_mode_ignores_where_the_unread_confidence_lies():
    masks = torch.rand(1, 3, 8, 8) > 0.5
    expected = resam_kernels.suppress_overlap_reference(masks, None, torch.tensor([3]), "drop")
    got = resam_kernels.suppress_overlap(masks, _on_meta(masks.float()), torch.tensor([3]), "drop")
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_inputs_a_kernel_does_not_take_run_the_reference():
    """float64 attention, LayerNorm wider than its tiles, a mask head with more channels than its
    kernel: the *_triton function refuses them (UnsupportedByTriton, a ValueError, before any launch)
    and the dispatcher runs the reference, gradients included."""
    from resam_kernels.launch import UnsupportedByTriton
    from resam_kernels.layer_norm import MAX_C, layer_norm_reference, layer_norm_triton
    from resam_kernels.mask_head import MAX_CHANNELS, mask_head_reference, mask_head_triton
    from resam_kernels.relpos_attention import relpos_attention_reference, relpos_attention_triton

    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    rel_h, rel_w = torch.randn(1, 2, 4, 2, generator=generator), torch.randn(1, 2, 4, 2, generator=generator)
    x = torch.randn(3, MAX_C + 4, generator=generator)
    upscaled = torch.randn(1, MAX_CHANNELS + 1, 2, 2, generator=generator)
    weight, bias, hyper_in = (torch.randn(MAX_CHANNELS + 1, 4, 2, 2, generator=generator),
                              torch.randn(4, generator=generator), torch.randn(1, 4, generator=generator))
    cases = [
        (lambda: relpos_attention_triton(q, k, v, rel_h, rel_w, 2, 0.5),
         lambda use: resam_kernels.relpos_attention(q, k, v, rel_h, rel_w, 2, 0.5, use_triton=use),
         relpos_attention_reference(q, k, v, rel_h, rel_w, 2, 0.5), "float64"),
        (lambda: layer_norm_triton(x, None, None, 1e-5), lambda use: resam_kernels.layer_norm(x, None, None, 1e-5),
         layer_norm_reference(x, None, None, 1e-5), f"at most {MAX_C}"),
        (lambda: mask_head_triton(upscaled, weight, bias, hyper_in),
         lambda use: resam_kernels.mask_head(upscaled, weight, bias, hyper_in, use_triton=use),
         mask_head_reference(upscaled, weight, bias, hyper_in), f"at most {MAX_CHANNELS} channels"),
    ]
    for refused, dispatched, expected, message in cases:
        with pytest.raises(UnsupportedByTriton, match=message):
            refused()
        assert issubclass(UnsupportedByTriton, ValueError)
        assert torch.equal(dispatched(True), expected)
    q.requires_grad_(True)
    resam_kernels.relpos_attention(q, k, v, rel_h, rel_w, 2, 0.5).sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float64


def test_the_confidence_keeps_its_gradient_where_one_is_wanted():
    from resam_kernels.entropy import confidence_reference

    logits = torch.randn(1, 2, 5, 7, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    for confidence in (resam_kernels.confidence(logits),
                       resam_kernels.entropy_filter(logits, 0.3, return_confidence=True)[1]):
        (grad,) = torch.autograd.grad(confidence.sum(), logits)
        (expected,) = torch.autograd.grad(confidence_reference(logits).sum(), logits)
        torch.testing.assert_close(grad, expected)
    with torch.no_grad():  # no gradient wanted: the kernel, same values
        torch.testing.assert_close(resam_kernels.confidence(logits), confidence_reference(logits),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("counts", [torch.tensor([2]), torch.tensor([2, 2]), torch.tensor(2),
                                    torch.tensor([2.0, 2.0, 2.0])])
def test_overlap_suppression_needs_one_integer_count_per_image(counts):
    masks = torch.ones(3, 2, 4, 8, dtype=torch.bool)
    for use_triton in (True, False):
        with pytest.raises(ValueError, match=r"needs integer counts of shape \(3,\) \(one per image\)"):
            resam_kernels.suppress_overlap(masks, None, counts, "drop", use_triton=use_triton)
