"""The trainer's memory features on CUDA: fused SDPA attention against SAM's own attention (fp32
and bf16), and a ReSAM step with activation checkpointing against one without."""

import sys
from pathlib import Path

import pytest
import torch

from resam_dist.config import Config
from resam_dist.model.attention import set_attention
from resam_dist.model.build import build_sam
from resam_dist.resam.queue import EmbeddingQueue
from resam_dist.resam.step import resam_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_step import make_batch, tiny_lora_model  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-3), (torch.bfloat16, 0.15)])
def test_sdpa_encoder_matches_official_on_cuda(dtype, atol):
    model = build_sam("vit_b", seed=0).to("cuda", dtype)
    for name, parameter in model.named_parameters():
        if "rel_pos" in name:
            parameter.data.normal_(0, 0.1)  # the official init is zero: make the relative terms matter
    images = torch.randn(1, 3, 1024, 1024, device="cuda", dtype=dtype)
    with torch.no_grad():
        fused = model.encode(images).float()
        set_attention(model.image_encoder, "official")
        official = model.encode(images).float()
    assert (fused - official).abs().max().item() < atol * max(1.0, official.abs().max().item())


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-3), (torch.bfloat16, 0.1)])
def test_fused_decoder_matches_official_on_cuda(dtype, atol):
    """ViT-B's mask decoder on 2 images x 50 prompts: SDPA attention, fused LayerNorm2d, the
    channels-last path and the fused mask head (`resam_kernels.mask_head`) against SAM's layers
    (logits relative to their largest magnitude)."""
    model = build_sam("vit_b", seed=0).to("cuda", dtype)
    generator = torch.Generator(device="cuda").manual_seed(0)
    features = torch.randn(2, 256, 64, 64, device="cuda", dtype=dtype, generator=generator)
    points = torch.rand(2, 50, 2, 2, device="cuda", generator=generator) * 1024
    labels = torch.tensor([1, 0], device="cuda").expand(2, 50, 2)
    counts = torch.tensor([50, 37], device="cuda")
    with torch.no_grad():
        fused, fused_iou = model.decode(features, counts, points, labels)
        set_attention(model, "official")
        official, official_iou = model.decode(features, counts, points, labels)
    scale = max(1.0, official.abs().max().item())
    assert (fused - official).abs().max().item() < atol * scale
    assert (fused_iou - official_iou).abs().max().item() < atol * max(1.0, official_iou.abs().max().item())


def test_checkpointed_step_matches_on_cuda():
    batch = make_batch().to("cuda")
    losses, grads = [], []
    for parts in ("off", "all"):
        torch.manual_seed(0)
        model = tiny_lora_model().cuda().train()
        model.set_activation_checkpointing(parts, prompts_per_group=2)
        cfg = Config()
        cfg.model.name = "tiny"
        cfg.train.activation_checkpointing = parts
        result = resam_step(model, batch, EmbeddingQueue(16, 128, device="cuda"), cfg)
        result.loss.backward()
        losses.append(result.loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-3)

