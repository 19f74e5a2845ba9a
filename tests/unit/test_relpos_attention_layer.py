"""SdpaAttention's relative-position path: the augmented SDPA function against the kernel
reference, and the cache of the gathered relative-position tables (frozen tables only)."""

import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from resam_dist.model.attention import (augmented_sdpa_attention, clear_relative_position_cache,
                                        relative_position_table, set_attention)
from resam_kernels.relpos_attention import relpos_attention_reference


@pytest.mark.parametrize("height,width", [(14, 14), (3, 5), (1, 7)])
def test_augmented_sdpa_equals_the_reference(height, width):
    generator = torch.Generator().manual_seed(height * width)
    batch, heads, head_dim, tokens = 2, 3, 16, height * width
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, generator=generator) for _ in range(3))
    rel_h = torch.randn(batch, heads, tokens, height, generator=generator)
    rel_w = torch.randn(batch, heads, tokens, width, generator=generator)
    expected = relpos_attention_reference(q, k, v, rel_h, rel_w, width, 0.25)
    torch.testing.assert_close(augmented_sdpa_attention(q, k, v, rel_h, rel_w, width, 0.25), expected,
                               atol=1e-5, rtol=1e-5)


def _frozen_layer(height, width):
    torch.manual_seed(0)
    layer = Attention(32, 2, use_rel_pos=True, input_size=(height, width))
    layer.rel_pos_h.data.normal_(0, 0.7)
    layer.rel_pos_w.data.normal_(0, 0.7)
    official = Attention(32, 2, use_rel_pos=True, input_size=(height, width))
    official.load_state_dict(layer.state_dict())
    set_attention(layer, "sdpa")
    for param in (layer.rel_pos_h, layer.rel_pos_w, official.rel_pos_h, official.rel_pos_w):
        param.requires_grad_(False)
    return layer, official


def test_frozen_tables_are_cached_and_invalidated_by_in_place_updates():
    layer, official = _frozen_layer(6, 5)
    x = torch.randn(2, 6, 5, 32)
    torch.testing.assert_close(layer(x), official(x), atol=1e-5, rtol=1e-5)
    cache = layer.__dict__["_relative_table_cache"]
    table_h = cache["rel_pos_h"][1]
    torch.testing.assert_close(table_h, relative_position_table(6, 6, layer.rel_pos_h), atol=0, rtol=0)
    layer(x)
    assert cache["rel_pos_h"][1] is table_h  # reused
    with torch.no_grad():  # an in-place update through the parameter bumps its version
        layer.rel_pos_h.mul_(-2.0)
        official.rel_pos_h.mul_(-2.0)
    torch.testing.assert_close(layer(x), official(x), atol=1e-5, rtol=1e-5)
    assert cache["rel_pos_h"][1] is not table_h
    new_state = {name: torch.randn_like(value) for name, value in official.state_dict().items()}
    official.load_state_dict(new_state)
    layer.load_state_dict(new_state)
    torch.testing.assert_close(layer(x), official(x), atol=1e-5, rtol=1e-5)
    # another grid size (same layer, smaller input): its own tables
    x_small = torch.randn(1, 4, 3, 32)
    torch.testing.assert_close(layer(x_small), official(x_small), atol=1e-5, rtol=1e-5)
    clear_relative_position_cache(layer)
    assert "_relative_table_cache" not in layer.__dict__
    assert "_relative_table_cache" not in str(layer.state_dict().keys())


def test_no_cache_while_the_tables_require_grad():
    layer, _ = _frozen_layer(4, 4)
    layer.rel_pos_h.requires_grad_(True)
    layer.rel_pos_w.requires_grad_(True)
    out = layer(torch.randn(1, 4, 4, 32))
    assert not layer.__dict__.get("_relative_table_cache")
    out.square().sum().backward()
    assert layer.rel_pos_h.grad is not None and layer.rel_pos_h.grad.abs().sum() > 0


def test_tables_made_in_inference_mode_are_not_reused_for_training():
    """A forward under torch.inference_mode() (evaluation) before a training step: the training
    step's tables must be ordinary tensors (autograd cannot save inference tensors)."""
    layer, official = _frozen_layer(4, 4)
    x = torch.randn(1, 4, 4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), official(x), atol=1e-5, rtol=1e-5)
    x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    layer(x_a).square().sum().backward()
    official(x_b).square().sum().backward()
    torch.testing.assert_close(x_a.grad, x_b.grad, atol=1e-5, rtol=1e-5)
    assert not layer.__dict__["_relative_table_cache"]["rel_pos_h"][1].is_inference()
