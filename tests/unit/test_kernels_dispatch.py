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
