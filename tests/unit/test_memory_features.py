"""The memory features of the trainer path give the same results as the plain model:
fused SDPA attention (relative positions folded into the dot product) and activation
checkpointing of encoder blocks, decoder prompt groups and the mask losses."""

import json

import pytest
import torch
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from segment_anything.modeling.transformer import Attention as DecoderAttention
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer

from resam_dist.config import Config, load_config
from resam_dist.model.attention import (FusedLayerNorm2d, SdpaAttention, SdpaDecoderAttention,
                                        SharedKeysTwoWayBlock, SharedKeysTwoWayTransformer, attention_kind,
                                        relative_position_table, set_attention)
from resam_dist.model.build import build_sam
from resam_dist.resam.losses import dice_loss, focal_loss, iou_mse_loss, mask_losses
from resam_dist.resam.queue import EmbeddingQueue
from resam_dist.resam.step import resam_step
from test_step import make_batch, tiny_lora_model


@pytest.mark.parametrize("height,width,window", [(14, 14, True), (16, 16, False), (7, 9, False), (1, 5, False)])
def test_sdpa_attention_matches_sam(height, width, window):
    """Random (non-zero) relative-position tables, odd and non-square grids; forward and all gradients."""
    torch.manual_seed(height * 31 + width)
    dim, heads = 48, 3
    official = Attention(dim, heads, use_rel_pos=True, input_size=(height, width))
    official.rel_pos_h.data.normal_(0, 0.7)
    official.rel_pos_w.data.normal_(0, 0.7)
    fused = Attention(dim, heads, use_rel_pos=True, input_size=(height, width))
    fused.load_state_dict(official.state_dict())
    set_attention(fused, "sdpa")
    assert isinstance(fused, SdpaAttention) and not isinstance(official, SdpaAttention)
    x = torch.randn(2, height, width, dim)
    x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_a, out_b = official(x_a), fused(x_b)
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out_a)
    out_a.backward(upstream)
    out_b.backward(upstream)
    torch.testing.assert_close(x_b.grad, x_a.grad, atol=1e-5, rtol=1e-4)
    for (name, p_a), (_, p_b) in zip(official.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p_b.grad, p_a.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("q_size,k_size,length", [(14, 14, 27), (64, 64, 127), (7, 9, 17), (8, 8, 9), (5, 3, 9)])
def test_relative_position_table_equals_sams(q_size, k_size, length):
    """Same values as SAM's get_rel_pos, including the resized table (length != 2 max - 1)."""
    table = torch.randn(length, 6)
    assert torch.equal(relative_position_table(q_size, k_size, table), get_rel_pos(q_size, k_size, table))


def _same_forward_and_gradients(official, fused, inputs, *, atol=1e-5, rtol=1e-5):
    fused.load_state_dict(official.state_dict())
    copies_a = [x.clone().requires_grad_() for x in inputs]
    copies_b = [x.clone().requires_grad_() for x in inputs]
    out_a, out_b = official(*copies_a), fused(*copies_b)
    torch.testing.assert_close(out_b, out_a, atol=atol, rtol=rtol)
    upstream = torch.randn_like(out_a)
    out_a.backward(upstream)
    out_b.backward(upstream)
    for x_a, x_b in zip(copies_a, copies_b):
        torch.testing.assert_close(x_b.grad, x_a.grad, atol=atol, rtol=rtol)
    for (name, p_a), (_, p_b) in zip(official.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p_b.grad, p_a.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("queries,keys,downsample", [(7, 4096, 2), (4096, 7, 2), (5, 5, 1), (1, 33, 2), (9, 16, 2), (9, 17, 2)])
def test_sdpa_decoder_attention_matches_sam(queries, keys, downsample):
    """Token-to-image, image-to-token and self attention of the mask decoder (8 heads); 16 keys
    or fewer take the explicit path, more the fused kernel."""
    torch.manual_seed(queries + keys)
    official = DecoderAttention(64, 8, downsample_rate=downsample)
    fused = DecoderAttention(64, 8, downsample_rate=downsample)
    set_attention(fused, "sdpa")
    assert isinstance(fused, SdpaDecoderAttention)
    q, k = torch.randn(3, queries, 64), torch.randn(3, keys, 64)
    _same_forward_and_gradients(official, fused, [q, k, torch.randn(3, keys, 64)])


@pytest.mark.parametrize("queries,keys,pe_on", [(4096, 7, "q"), (7, 300, "k"), (5, 33, "k")])
def test_attend_with_positional_encoding_matches_sam(queries, keys, pe_on):
    """attend(q, k, v, q_pe / k_pe) = SAM's attention(q + q_pe, k + k_pe, v): values and gradients
    of q, k, v, the encoding (shared by the batch: stride 0) and every parameter."""
    torch.manual_seed(queries + keys)
    official = DecoderAttention(64, 8, downsample_rate=2)
    fused = DecoderAttention(64, 8, downsample_rate=2)
    fused.load_state_dict(official.state_dict())
    set_attention(fused, "sdpa")
    q, k, v = torch.randn(3, queries, 64), torch.randn(3, keys, 64), torch.randn(3, keys, 64)
    pe = torch.randn(1, queries if pe_on == "q" else keys, 64)
    copies_a = [x.clone().requires_grad_() for x in (q, k, v, pe)]
    copies_b = [x.clone().requires_grad_() for x in (q, k, v, pe)]
    q_a, k_a, v_a, pe_a = copies_a
    if pe_on == "q":
        out_a = official(q=q_a + pe_a.expand(3, -1, -1), k=k_a, v=v_a)
    else:
        out_a = official(q=q_a, k=k_a + pe_a.expand(3, -1, -1), v=v_a)
    q_b, k_b, v_b, pe_b = copies_b
    pe_arg = {f"{pe_on}_pe": pe_b.expand(3, -1, -1)}  # as the transformer passes it: batch stride 0
    out_b = fused.attend(q_b, k_b, v_b, **pe_arg)
    torch.testing.assert_close(out_b, out_a, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out_a)
    out_a.backward(upstream)
    out_b.backward(upstream)
    for name, x_a, x_b in zip("qkv", copies_a, copies_b):
        torch.testing.assert_close(x_b.grad, x_a.grad, atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(copies_b[3].grad, copies_a[3].grad, atol=1e-4, rtol=1e-4, msg="pe")
    # float32 sums over up to 3 x 4096 tokens in another order; k_proj.bias's gradient is zero up
    # to rounding (softmax ignores a shift shared by all keys), hence one scale for all parameters
    scale = max(p.grad.abs().max().item() for p in official.parameters())
    for (name, p_a), (_, p_b) in zip(official.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(p_b.grad, p_a.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)


def test_shared_keys_transformer_matches_sam_and_keeps_no_keys_plus_pe():
    """The whole two-way transformer (2 blocks + final attention) with the fused layers: SAM's
    values and gradients, and the N x hw x C sum keys + key_pe is never kept for the backward
    (what is saved shrinks by at least three such tensors)."""
    torch.manual_seed(0)
    official = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64)
    fused = TwoWayTransformer(depth=2, embedding_dim=32, num_heads=4, mlp_dim=64)
    fused.load_state_dict(official.state_dict())
    set_attention(fused, "sdpa")
    assert isinstance(fused, SharedKeysTwoWayTransformer)
    image, points = torch.randn(3, 32, 8, 8), torch.randn(3, 7, 32)
    image_pe = torch.randn(1, 32, 8, 8).expand(3, -1, -1, -1)
    saved_bytes = {}
    results = {}
    for name, module in (("official", official), ("fused", fused)):
        inputs = [image.clone().requires_grad_(), points.clone().requires_grad_()]
        storages = {}  # distinct storages kept for the backward -> bytes

        def pack(tensor, storages=storages):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            queries, keys = module(inputs[0], image_pe, inputs[1])
        saved_bytes[name] = sum(storages.values())
        (queries.square().sum() + keys.sin().sum()).backward()
        results[name] = (queries, keys, *(x.grad for x in inputs),
                         *(p.grad for p in module.parameters()))
    for got, expected in zip(results["fused"], results["official"]):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    keys_bytes = 3 * 64 * 32 * 4  # one N x hw x C float32 tensor
    assert saved_bytes["fused"] <= saved_bytes["official"] - 3 * keys_bytes, saved_bytes


@pytest.mark.parametrize("skip_first_layer_pe", [True, False])
def test_shared_keys_block_matches_sam(skip_first_layer_pe):
    """Same values (the same additions, one of them shared) and gradients as SAM's block."""
    torch.manual_seed(2)
    official = TwoWayAttentionBlock(32, 4, mlp_dim=64, skip_first_layer_pe=skip_first_layer_pe)
    shared = TwoWayAttentionBlock(32, 4, mlp_dim=64, skip_first_layer_pe=skip_first_layer_pe)
    shared.load_state_dict(official.state_dict())
    shared.__class__ = SharedKeysTwoWayBlock  # the attention layers inside stay SAM's, as in `official`
    inputs = [torch.randn(3, 6, 32), torch.randn(3, 50, 32), torch.randn(3, 6, 32), torch.randn(3, 50, 32)]
    copies_a = [x.clone().requires_grad_() for x in inputs]
    copies_b = [x.clone().requires_grad_() for x in inputs]
    out_a, out_b = official(*copies_a), shared(*copies_b)
    for got, expected in zip(out_b, out_a):
        assert torch.equal(got, expected)
    upstream = [torch.randn_like(t) for t in out_a]
    torch.autograd.backward(out_a, upstream)
    torch.autograd.backward(out_b, upstream)
    for x_a, x_b in zip(copies_a, copies_b):
        torch.testing.assert_close(x_b.grad, x_a.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_layer_norm_2d_matches_sam(channels_last):
    torch.manual_seed(1)
    official, fused = LayerNorm2d(24), LayerNorm2d(24)
    official.weight.data.normal_(1, 0.3)
    official.bias.data.normal_(0, 0.3)
    set_attention(fused, "sdpa")
    assert isinstance(fused, FusedLayerNorm2d)
    x = torch.randn(2, 24, 9, 13) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    _same_forward_and_gradients(official, fused, [x])


def test_set_attention_switches_the_whole_model_and_keeps_the_state_dict():
    model = build_sam("tiny", seed=0)  # "sdpa" by default: encoder, decoder and both LayerNorm2d sites
    assert attention_kind(model) == "sdpa"
    assert isinstance(model.mask_decoder.transformer.layers[0].cross_attn_image_to_token, SdpaDecoderAttention)
    assert isinstance(model.mask_decoder.output_upscaling[1], FusedLayerNorm2d)
    assert all(isinstance(block, SharedKeysTwoWayBlock) for block in model.mask_decoder.transformer.layers)
    keys = list(model.state_dict())
    set_attention(model, "official")
    assert attention_kind(model) == "official" and list(model.state_dict()) == keys
    assert type(model.mask_decoder.output_upscaling[1]) is LayerNorm2d
    set_attention(model.image_encoder, "sdpa")
    with pytest.raises(ValueError, match="mixes attention kinds"):
        attention_kind(model)
    with pytest.raises(ValueError, match="attention must be one of"):
        set_attention(model, "flash")


def test_decoder_gives_the_same_masks_with_either_kind():
    """The whole batched decode (channels-last path) with SAM's layers and with the fused ones."""
    from test_model import random_prompts

    model = build_sam("tiny", seed=0)
    features = torch.randn(2, model.embed_dim, 16, 16)
    points, labels, boxes = random_prompts(2, 4, 1, seed=5)
    counts = torch.tensor([4, 3])
    with torch.no_grad():
        fused = model.decode(features, counts, points, labels, boxes)
        set_attention(model, "official")
        official = model.decode(features, counts, points, labels, boxes)
    for got, expected in zip(fused, official):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_mask_losses_equal_the_separate_losses_and_recompute_changes_nothing():
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 4, 33, 31, generator=generator) * 3).requires_grad_()
    target = torch.rand(2, 4, 33, 31, generator=generator) > 0.6
    valid = torch.tensor([[True, True, False, True], [False, True, True, False]])
    pred_iou = torch.rand(2, 4, generator=generator).requires_grad_()
    expected = (focal_loss(logits, target, valid), dice_loss(logits, target, valid),
                iou_mse_loss(pred_iou, logits, target, valid))
    grads = torch.autograd.grad(sum(expected), (logits, pred_iou))
    for recompute in (False, True):
        got = mask_losses(logits, pred_iou, target, valid, recompute=recompute)
        for value, reference in zip(got, expected):
            torch.testing.assert_close(value, reference)
        for grad, reference in zip(torch.autograd.grad(sum(got), (logits, pred_iou)), grads):
            torch.testing.assert_close(grad, reference)
    none_valid = torch.zeros_like(valid)
    zeros = mask_losses(logits, pred_iou, target, none_valid, recompute=True)
    assert all(value.item() == 0.0 and value.requires_grad for value in zeros)


def test_mask_losses_of_low_res_logits_equal_those_of_the_upsampled_logits():
    """low_res=True: the losses (and gradients) of the 4x bilinear upsampling of the logits, with
    and without recomputation; a target that is not 4x the logits is refused."""
    generator = torch.Generator().manual_seed(1)
    low = (torch.randn(2, 3, 9, 7, generator=generator) * 4).requires_grad_()
    target = torch.rand(2, 3, 36, 28, generator=generator) > 0.5
    valid = torch.tensor([[True, False, True], [True, True, True]])
    pred_iou = torch.rand(2, 3, generator=generator).requires_grad_()
    upsampled = torch.nn.functional.interpolate(low.reshape(6, 1, 9, 7), size=(36, 28), mode="bilinear",
                                                align_corners=False).reshape(2, 3, 36, 28)
    expected = mask_losses(upsampled, pred_iou, target, valid)
    grads = torch.autograd.grad(sum(expected), (low, pred_iou))
    for recompute in (False, True):
        got = mask_losses(low, pred_iou, target, valid, low_res=True, recompute=recompute)
        for value, reference in zip(got, expected):
            torch.testing.assert_close(value, reference, atol=1e-6, rtol=1e-5)
        for grad, reference in zip(torch.autograd.grad(sum(got), (low, pred_iou)), grads):
            torch.testing.assert_close(grad, reference, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="4x their"):
        mask_losses(low, pred_iou, target[..., :35, :], valid, low_res=True)


def test_activation_checkpointing_gives_the_same_step_loss_and_gradients():
    """resam_step (teacher, Refine, Requery, student, SSA) with and without checkpointing; groups of
    2 prompts so the decoder is split inside a chunk."""
    batch = make_batch()
    results = []
    for parts in ("off", "encoder", "decoder", "all"):
        torch.manual_seed(0)
        model = tiny_lora_model().train()
        model.set_activation_checkpointing(parts, prompts_per_group=2)
        cfg = Config()
        cfg.model.name = "tiny"
        cfg.train.activation_checkpointing = parts
        cfg.kernels.enabled = False
        queue = EmbeddingQueue(16, 128)
        result = resam_step(model, batch, queue, cfg)
        result.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((result.loss.detach(), grads))
    (loss_plain, grads_plain) = results[0]
    for loss_ckpt, grads_ckpt in results[1:]:
        torch.testing.assert_close(loss_ckpt, loss_plain)
        assert grads_plain.keys() == grads_ckpt.keys() and len(grads_plain) > 0
        for name in grads_plain:
            torch.testing.assert_close(grads_ckpt[name], grads_plain[name], atol=1e-6, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="parts must be one of"):
        tiny_lora_model().set_activation_checkpointing(True)


def test_step_keeps_no_full_resolution_logits_for_the_backward():
    """With the kernels on (Triton's interpreter here, CUDA in production) the student's loss reads
    the decoder's low-res logits: nothing of B x K x S x S float is saved for the backward, and
    the loss and gradients equal those of the torch reference path."""
    batch = make_batch()
    size = batch.gt_masks.shape[-1]
    results = []
    for kernels in (True, False):
        torch.manual_seed(0)
        model = tiny_lora_model().train()
        cfg = Config()
        cfg.model.name = "tiny"
        cfg.kernels.enabled = kernels
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            result = resam_step(model, batch, EmbeddingQueue(16, 128), cfg)
        instances = batch.gt_masks.shape[0] * batch.gt_masks.shape[1]  # B K
        # mask logits: at most B K planes of S x S (the tiny encoder's 256-token attention
        # matrices are 256 x 256 too, but B x heads of them)
        full_resolution = [tuple(t.shape) for t in saved
                           if t.is_floating_point() and t.dim() >= 2 and tuple(t.shape[-2:]) == (size, size)
                           and t.shape[:-2].numel() <= instances]
        if kernels:
            assert full_resolution == []
        else:  # the reference path keeps them (what the test would catch on the kernel path)
            assert full_resolution
        result.loss.backward()
        results.append((result.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_kernels, grads_kernels), (loss_reference, grads_reference) = results
    torch.testing.assert_close(loss_kernels, loss_reference, atol=1e-5, rtol=1e-5)
    assert grads_kernels.keys() == grads_reference.keys() and grads_kernels
    for name in grads_kernels:
        torch.testing.assert_close(grads_kernels[name], grads_reference[name], atol=1e-5, rtol=1e-3, msg=name)


def test_checkpointing_is_refused_with_zero3(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"train": {"activation_checkpointing": "encoder"},
                                "deepspeed": {"zero_optimization": {"stage": 3}}}))
    with pytest.raises(ValueError, match="train.activation_checkpointing.*ZeRO stage 3"):
        load_config(path)
    path.write_text(json.dumps({"train": {"activation_checkpointing": True}}))
    with pytest.raises(ValueError, match=r"train.activation_checkpointing.*former true/false are now"):
        load_config(path)
    path.write_text(json.dumps({"model": {"attention": "fast"}}))
    with pytest.raises(ValueError, match="model.attention"):
        load_config(path)


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_upscaling_stage1_matches_sam(channels_last):
    """Transposed conv without bias + (bias, LayerNorm2d, GELU) in one pass, against SAM's three
    modules: values and the gradients of the input and of every parameter."""
    torch.manual_seed(4)
    model = build_sam("tiny", seed=0)
    decoder = model.mask_decoder
    conv, norm = decoder.output_upscaling[0], decoder.output_upscaling[1]
    norm.weight.data.normal_(1, 0.3)
    norm.bias.data.normal_(0, 0.3)
    conv.bias.data.normal_(0, 0.5)
    src = torch.randn(3, model.embed_dim, 7, 9) * 2
    if channels_last:
        src = src.to(memory_format=torch.channels_last)
    conv_calls = []
    handle = conv.register_forward_pre_hook(lambda module, args: conv_calls.append(1))
    results = []
    try:
        for kind in ("sdpa", "official"):
            set_attention(decoder, kind)
            decoder.zero_grad(set_to_none=True)
            x = src.clone().requires_grad_()
            out = decoder._upscale_stage1(x)  # N x C/4 x 14 x 18
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
            params = {name: p.grad.clone() for name, p in decoder.output_upscaling[:3].named_parameters()}
            results.append((out.detach(), x.grad, params))
    finally:
        handle.remove()
    assert len(conv_calls) == 1  # only the official path calls the conv module
    (out, grad, params), (out_ref, grad_ref, params_ref) = results
    assert out.shape == out_ref.shape == (3, model.embed_dim // 4, 14, 18)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, grad_ref, atol=1e-5, rtol=1e-4)
    assert set(params) == set(params_ref) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    for name in params:
        torch.testing.assert_close(params[name], params_ref[name], atol=1e-4, rtol=1e-4, msg=name)
