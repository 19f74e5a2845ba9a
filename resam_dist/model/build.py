"""SAM registry and official checkpoint loading.

`tiny` is a ~2.9 M-parameter SAM for tests and the demo (256 px, 16 x 16 feature map with 128
channels, 6 encoder blocks of width 160 with global attention in blocks 2 and 5, a 128-wide
decoder: cheap enough to pretrain and adapt on a 2-core CPU). `vit_b`, `vit_l` and `vit_h` use
the official hyper-parameters (1024 px) and load the official checkpoints
(`sam_vit_b_01ec64.pth`, ...) from a local path; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from segment_anything.modeling import ImageEncoderViT, PromptEncoder, TwoWayTransformer

from resam_dist.model.attention import set_attention
from resam_dist.model.sam import BatchedMaskDecoder, Fp32PositionEmbedding, PromptableSam

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
PIXEL_MEAN = (123.675, 116.28, 103.53)
"""SAM's per-channel RGB mean on the 0-255 scale."""
PIXEL_STD = (58.395, 57.12, 57.375)
"""SAM's per-channel RGB standard deviation on the 0-255 scale."""


@dataclass(frozen=True)
class SamSpec:
    """Hyper-parameters of one SAM variant."""

    image_size: int
    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    prompt_embed_dim: int = PROMPT_EMBED_DIM
    """Channels of the feature map, the prompt embeddings and the decoder transformer."""


SAM_REGISTRY: dict[str, SamSpec] = {
    "tiny": SamSpec(image_size=256, encoder_embed_dim=160, encoder_depth=6, encoder_num_heads=5,
                    encoder_global_attn_indexes=(2, 5), window_size=8, decoder_mlp_dim=512,
                    iou_head_hidden_dim=128, prompt_embed_dim=128),
    "vit_b": SamSpec(image_size=1024, encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12,
                     encoder_global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamSpec(image_size=1024, encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                     encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamSpec(image_size=1024, encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                     encoder_global_attn_indexes=(7, 15, 23, 31)),
}
IMAGE_SIZE: dict[str, int] = {name: spec.image_size for name, spec in SAM_REGISTRY.items()}


def normalise_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """SAM's input normalisation of RGB pixels on the 0-255 scale: ... x 3 x H x W -> float32."""
    mean = torch.tensor(PIXEL_MEAN, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=pixels.device).view(3, 1, 1)
    return (pixels.float() - mean) / std


def build_sam(name: str, checkpoint: str | Path | None = None, *, seed: int | None = None,
              attention: str = "sdpa") -> PromptableSam:
    """Build SAM variant `name`, randomly initialised or loaded from an official-layout checkpoint.

    attention: "sdpa" (fused attention and LayerNorm2d in encoder and decoder,
    `resam_dist.model.attention`) or "official" (SAM's code); the parameters are the same either way.

    seed: seeds the random initialisation (the global RNG is left untouched); None uses the
    global RNG. With a checkpoint the model is built on the meta device and the checkpoint
    tensors are assigned (no wasted random init of a large model). Returns the model in eval mode.
    """
    if name not in SAM_REGISTRY:
        raise ValueError(f"unknown SAM variant {name!r}; choose one of {sorted(SAM_REGISTRY)}")
    spec = SAM_REGISTRY[name]
    if checkpoint is not None:
        state_dict = _read_checkpoint(Path(checkpoint))
        with torch.device("meta"):
            model = _build(spec)
        check_state_dict(model, state_dict, source=str(checkpoint), target=f"SAM {name!r}")
        model.load_state_dict(state_dict, strict=True, assign=True)
        leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        assert not leftover, f"tensors not filled by the checkpoint: {leftover[:5]}"
    elif seed is None:
        model = _build(spec)
    else:
        with torch.random.fork_rng(devices=[]):  # restores the CPU generator only, so seed only that
            torch.default_generator.manual_seed(seed)  # (torch.manual_seed would reseed every CUDA device)
            model = _build(spec)
    set_attention(model, attention)
    return model.eval()


def _build(spec: SamSpec) -> PromptableSam:
    feature_size = spec.image_size // PATCH_SIZE
    image_encoder = ImageEncoderViT(
        img_size=spec.image_size,
        patch_size=PATCH_SIZE,
        embed_dim=spec.encoder_embed_dim,
        depth=spec.encoder_depth,
        num_heads=spec.encoder_num_heads,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=spec.encoder_global_attn_indexes,
        window_size=spec.window_size,
        out_chans=spec.prompt_embed_dim,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=spec.prompt_embed_dim,
        image_embedding_size=(feature_size, feature_size),
        input_image_size=(spec.image_size, spec.image_size),
        mask_in_chans=16,
    )
    pe_layer = Fp32PositionEmbedding(spec.prompt_embed_dim // 2)
    pe_layer.positional_encoding_gaussian_matrix.copy_(prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
    prompt_encoder.pe_layer = pe_layer
    mask_decoder = BatchedMaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=spec.decoder_depth,
            embedding_dim=spec.prompt_embed_dim,
            mlp_dim=spec.decoder_mlp_dim,
            num_heads=spec.decoder_num_heads,
        ),
        transformer_dim=spec.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=spec.iou_head_hidden_dim,
    )
    return PromptableSam(image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"SAM checkpoint {path} does not exist (or is not a file)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"SAM checkpoint {path} could not be read: {error}") from error
    if not isinstance(state_dict, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise ValueError(f"SAM checkpoint {path} is not a flat state dict of tensors "
                         "(expected the official layout: image_encoder.*, prompt_encoder.*, mask_decoder.*)")
    return {key: value.float() if value.is_floating_point() else value for key, value in state_dict.items()}


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
                     target: str = "the model") -> None:
    """Raise ValueError (naming `source` and `target`) unless `state_dict` has exactly the keys and
    shapes of `model`'s state dict."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
                   for key in sorted(set(expected) & set(state_dict))
                   if tuple(state_dict[key].shape) != tuple(expected[key].shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", wrong_shape)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise ValueError(f"checkpoint {source} does not match {target}: " + "; ".join(problems))
