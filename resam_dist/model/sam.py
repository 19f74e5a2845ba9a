"""SAM with batched prompting: many instances of many images through the mask decoder at once.

`PromptableSam` holds segment-anything's parts under the official attribute names
(`image_encoder`, `prompt_encoder`, `mask_decoder`), so its state dict has the key layout of the
official checkpoints. Images come in already SAM-normalised (the data pipeline does that).

Coordinates are continuous (x, y) positions on the S x S canvas, pixel centres at +0.5
(`resam_dist.resam.prompts`). SAM's prompt encoder expects integer pixel indices and adds half a
pixel itself, so `decode` subtracts 0.5 before handing prompts over: the positional encoding is
then evaluated exactly at the given position (a box (x0, y0, x1, y1) with exclusive x1/y1 is
encoded at its outer edges).

ZeRO-3 note: every parameter is used inside the `forward()` of a module. `PromptEncoder` and
`BatchedMaskDecoder` read some of their children's weights directly (embedding tables), so the
trainer marks them as DeepSpeed leaf modules: `PromptableSam.leaf_modules()`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

import resam_kernels
from resam_dist.data.batch import valid_from_counts
from resam_dist.model.attention import FusedLayerNorm2d


CHECKPOINT_PARTS = ("off", "encoder", "decoder", "all")
"""Values of `train.activation_checkpointing` / `PromptableSam.set_activation_checkpointing`."""


class Fp32PositionEmbedding(PositionEmbeddingRandom):
    """SAM's random-Fourier positional encoding, always evaluated in float32.

    SAM's version multiplies float32 coordinates with its (possibly bf16) frequency buffer, which
    fails once the module is cast to bf16, and the sine arguments need float32 precision anyway.
    The result is returned in the buffer's dtype. Same buffer name, so the same state-dict key.
    """

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        frequencies = self.positional_encoding_gaussian_matrix  # 2 x F
        coords = 2 * coords.float() - 1  # ... x 2 in [-1, 1]
        angles = 2 * math.pi * (coords @ frequencies.float())  # ... x F
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(frequencies.dtype)  # ... x 2F


class BatchedMaskDecoder(MaskDecoder):
    """SAM's mask decoder taking prompts of many images at once, single-mask output.

    Same submodules and state-dict keys as `MaskDecoder`. SAM's `predict_masks` takes one image
    per call and repeats its embedding for every prompt; here each prompt carries the index of
    its image and the embeddings are gathered by that index. Only the first mask token (SAM's
    single-mask output) is turned into a mask.
    """

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_index: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings B x C x h x w; image_index N (image of each prompt); image_pe
        1 x C x h x w; sparse N x T x C; dense N (or 1) x C x h x w.
        Returns (low-res mask logits N x 1 x 4h x 4w, iou N x 1)."""
        dtype = self.iou_token.weight.dtype
        num_prompts = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)  # (1 + M) x C
        output_tokens = output_tokens.unsqueeze(0).expand(num_prompts, -1, -1)  # N x (1 + M) x C
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings.to(dtype)], dim=1)  # N x T' x C

        # channels-last (N x h x w x C) storage: the transformer's token view (N x hw x C) and the
        # upscaling convolutions then work on it without transposing copies
        images = image_embeddings.to(dtype).permute(0, 2, 3, 1)  # B x h x w x C
        dense = dense_prompt_embeddings.to(dtype).permute(0, 2, 3, 1)  # N (or 1) x h x w x C
        if dense.shape[0] >= 1 and (dense.shape[0] == 1 or dense.stride(0) == 0):
            # one dense embedding for every prompt (no mask prompts: SAM expands its no-mask
            # embedding): add it to the B images before gathering N copies, not to the N copies
            src = (images + dense[:1])[image_index]  # N x h x w x C
        else:
            src = images[image_index] + dense  # N x h x w x C
        src = src.permute(0, 3, 1, 2)  # N x C x h x w (channels-last storage)
        # channels-last too: the transformer's N x hw x C view of it then has unit channel stride
        # (SAM's C x hw layout makes every `keys + key_pe` over N x hw x C a strided gather)
        pos_src = image_pe.to(dtype).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # 1 x C x h x w
        pos_src = pos_src.expand(num_prompts, -1, -1, -1)  # N x C x h x w
        n, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)  # N x T' x C, N x hw x C
        iou_token_out = hs[:, 0, :]  # N x C
        mask_token_out = hs[:, 1, :]  # N x C, the single-mask token

        src = src.reshape(n, h, w, c).permute(0, 3, 1, 2)  # N x C x h x w, channels-last view
        hyper_in = self.output_hypernetworks_mlps[0](mask_token_out)  # N x C/8
        masks = self._upscale_stage2_and_masks(self._upscale_stage1(src), hyper_in)  # N x 1 x 4h x 4w
        iou_pred = self.iou_prediction_head(iou_token_out)[:, :1]  # N x 1
        return masks, iou_pred

    def _upscale_stage1(self, src: torch.Tensor) -> torch.Tensor:
        """SAM's `output_upscaling[:3]` (transposed conv, LayerNorm2d, GELU):
        N x C x h x w -> N x C/4 x 2h x 2w.

        With the fused LayerNorm2d ("sdpa" kind) and SAM's exact GELU, the convolution runs
        without its bias, and bias add, LayerNorm2d and GELU are one pass over the channels-last
        result (`FusedLayerNorm2d.forward_fused`); otherwise ("official") SAM's modules."""
        conv, norm, activation = self.output_upscaling[:3]
        if (isinstance(norm, FusedLayerNorm2d) and type(conv) is nn.ConvTranspose2d
                and type(activation) is nn.GELU and activation.approximate == "none"):
            upscaled = F.conv_transpose2d(src, conv.weight, None, conv.stride, conv.padding, conv.output_padding,
                                          conv.groups, conv.dilation)  # N x C/4 x 2h x 2w, no bias
            return norm.forward_fused(upscaled, pre_bias=conv.bias, gelu=True)
        return activation(norm(conv(src)))

    def _upscale_stage2_and_masks(self, upscaled: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """SAM's `output_upscaling[3:]` (transposed conv, GELU) and the dot product of every pixel
        with the mask token's hypernetwork output: upscaled N x C/4 x 2h x 2w, hyper_in N x C/8
        -> mask logits N x 1 x 4h x 4w.

        With the fused layers ("sdpa" kind: the stage-1 norm is a `FusedLayerNorm2d`), SAM's
        exact GELU and a CUDA input, the whole stage is one Triton kernel
        (`resam_kernels.mask_head`): float32 arithmetic and float32 logits, without the
        N x C/8 x 4h x 4w activations. Otherwise ("official", or CPU) SAM's modules, logits in
        the input's dtype."""
        conv, activation = self.output_upscaling[3:]
        if (upscaled.is_cuda and isinstance(self.output_upscaling[1], FusedLayerNorm2d)
                and type(conv) is nn.ConvTranspose2d and conv.bias is not None
                and conv.kernel_size == conv.stride == (2, 2) and conv.padding == conv.output_padding == (0, 0)
                and conv.dilation == (1, 1) and conv.groups == 1
                and type(activation) is nn.GELU and activation.approximate == "none"):
            return resam_kernels.mask_head(upscaled, conv.weight, conv.bias, hyper_in)  # N x 1 x 4h x 4w float32
        pixels = activation(conv(upscaled))  # N x C/8 x 4h x 4w
        n, c_up, h_up, w_up = pixels.shape
        pixels = pixels.permute(0, 2, 3, 1).reshape(n, h_up * w_up, c_up)  # N x 16hw x C/8 (a view if channels-last)
        return (pixels @ hyper_in.unsqueeze(2)).reshape(n, 1, h_up, w_up)  # N x 1 x 4h x 4w


class PromptableSam(nn.Module):
    """SAM image encoder + prompt encoder + batched mask decoder.

    Attributes: `image_size` (S), `feature_stride` (16), `embed_dim` (channels of the feature
    map, 256).
    """

    feature_stride = 16

    def __init__(self, *, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder,
                 mask_decoder: BatchedMaskDecoder) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = int(image_encoder.img_size)
        self.embed_dim = int(prompt_encoder.embed_dim)
        self.checkpoint_encoder = False  # recompute each encoder block in the backward
        self.checkpoint_prompts = 0  # > 0: recompute the decoder per group of this many prompts

    def set_activation_checkpointing(self, parts: str, *, prompts_per_group: int = 32) -> None:
        """Recompute activations in the backward instead of storing them: parts "encoder" (each
        image-encoder block keeps only its input), "decoder" (the mask decoder, per group of at most
        `prompts_per_group` prompts), "all" or "off". Applies to forwards with gradient enabled;
        results are unchanged."""
        if parts not in CHECKPOINT_PARTS:
            raise ValueError(f"activation checkpointing parts must be one of {CHECKPOINT_PARTS}, got {parts!r}")
        if prompts_per_group < 1:
            raise ValueError(f"prompts_per_group must be >= 1, got {prompts_per_group}")
        self.checkpoint_encoder = parts in ("encoder", "all")
        self.checkpoint_prompts = prompts_per_group if parts in ("decoder", "all") else 0

    def _checkpointing_decoder(self) -> bool:
        return self.checkpoint_prompts > 0 and torch.is_grad_enabled()

    def leaf_modules(self) -> list[nn.Module]:
        """Modules that read their children's parameters without calling the children's forward:
        ZeRO-3 must gather all their parameters when their own forward starts."""
        return [self.prompt_encoder, self.mask_decoder]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images B x 3 x S x S (SAM-normalised) -> features B x 256 x S/16 x S/16, in the
        parameters' dtype (images are cast to it, e.g. bf16 after DeepSpeed converts the model)."""
        size = self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be B x 3 x {size} x {size}, got {tuple(images.shape)}")
        dtype = self.image_encoder.patch_embed.proj.weight.dtype  # metadata only, also under ZeRO-3
        if not (self.checkpoint_encoder and torch.is_grad_enabled()):
            return self.image_encoder(images.to(dtype))
        encoder = self.image_encoder  # ImageEncoderViT.forward, one checkpoint per block
        tokens = encoder.patch_embed(images.to(dtype))  # B x S/16 x S/16 x D
        if encoder.pos_embed is not None:
            tokens = tokens + encoder.pos_embed
        for block in encoder.blocks:
            tokens = checkpoint(block, tokens, use_reentrant=False)
        return encoder.neck(tokens.permute(0, 3, 1, 2))  # B x C x S/16 x S/16

    def decode(self, features: torch.Tensor, counts: torch.Tensor, points: torch.Tensor | None = None,
               point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
               max_instances: int = 50, *, min_chunks: int = 1, upsample: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for K prompted instances per image.

        features B x C x h x w (from `encode`); counts B (instances k >= counts[b] are padding);
        points B x K x P x 2 (x, y) with point_labels B x K x P (1 positive, 0 negative,
        -1 ignored); boxes B x K x 4 (x0, y0, x1, y1); points, boxes or both.
        Returns (logits B x K x S x S float32, iou B x K float32); padding instances get zeros
        and are not computed. upsample=False: the decoder's low-resolution logits B x K x S/4 x
        S/4 instead (those that are upsampled 4x bilinearly to S x S; the training loss reads
        them through `resam_kernels.upsampled_mask_loss_terms` without the S x S logits).
        The instances of all images go through the decoder together, in chunks of at most
        `max_instances` instances per image. At least `min_chunks` decoder
        calls are made (empty ones included): under ZeRO-3 every rank must make the same number
        of calls, so pass the maximum over ranks there.
        """
        num_images = features.shape[0]
        num_instances, fewest = self._check_prompts(features, counts, points, point_labels, boxes)
        if max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {max_instances}")
        size = self.image_size if upsample else self.image_size // 4
        image_pe = self.prompt_encoder.get_dense_pe()  # 1 x C x h x w (a buffer, no parameters)
        num_chunks = max(math.ceil(num_instances / max_instances), min_chunks)
        checkpointing = self._checkpointing_decoder()
        if fewest == num_instances and num_chunks > 0 and not checkpointing:
            # every instance is real (no padding): the decoder's outputs are already in B x K order
            # (num_chunks = 0 only for K = 0 with min_chunks = 0: no call, the empty result below)
            return self._decode_all(features, image_pe, points, point_labels, boxes, num_chunks, max_instances,
                                    upsample)

        logits = torch.zeros(num_images, num_instances, size, size, device=features.device,
                             dtype=torch.float32)  # B x K x S x S
        iou = torch.zeros(num_images, num_instances, device=features.device, dtype=torch.float32)  # B x K
        valid = valid_from_counts(counts.to(features.device), num_instances)  # B x K
        for chunk in range(num_chunks):
            start = chunk * max_instances
            chunk_valid = valid[:, start:start + max_instances]  # B x k
            image_index, chunk_index = chunk_valid.nonzero(as_tuple=True)  # N, N
            instance_index = chunk_index + start  # N
            prompt_points, prompt_boxes = self._gather_prompts(points, point_labels, boxes, image_index,
                                                               instance_index)
            if not checkpointing:
                logits[image_index, instance_index], iou[image_index, instance_index] = self._decode_prompts(
                    features, image_pe, image_index, prompt_points, prompt_boxes, upsample)
                continue
            # groups of prompts, each keeping only its inputs for the backward
            for first in range(0, image_index.shape[0], self.checkpoint_prompts):
                group = slice(first, first + self.checkpoint_prompts)
                group_points = None if prompt_points is None else (prompt_points[0][group], prompt_points[1][group])
                group_boxes = None if prompt_boxes is None else prompt_boxes[group]
                group_logits, group_iou = checkpoint(self._decode_prompts, features, image_pe, image_index[group],
                                                     group_points, group_boxes, upsample, use_reentrant=False)
                logits[image_index[group], instance_index[group]] = group_logits  # n x S x S
                iou[image_index[group], instance_index[group]] = group_iou
        return logits, iou

    def _decode_all(self, features: torch.Tensor, image_pe: torch.Tensor, points: torch.Tensor | None,
                    point_labels: torch.Tensor | None, boxes: torch.Tensor | None, num_chunks: int,
                    max_instances: int, upsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """`decode` when no instance is padding: the prompts of chunk c are instances
        [c m, (c + 1) m) of every image in image-major order, so the decoder's N x S x S output is
        a B x k x S x S view: no zero-filled B x K x S x S buffer, no scatter into it (and no
        gather in the backward), no nonzero() host synchronisation."""
        num_images, device = features.shape[0], features.device
        size = self.image_size if upsample else self.image_size // 4
        num_instances = (points if points is not None else boxes).shape[1]
        chunk_logits, chunk_iou = [], []
        for chunk in range(num_chunks):
            start = chunk * max_instances
            k = max(min(max_instances, num_instances - start), 0)  # 0 for the extra calls of min_chunks
            image_index = torch.arange(num_images, device=device).repeat_interleave(k)  # N = B k
            instance_index = (torch.arange(k, device=device) + start).repeat(num_images)  # N
            prompt_points, prompt_boxes = self._gather_prompts(points, point_labels, boxes, image_index,
                                                               instance_index)
            logits, iou = self._decode_prompts(features, image_pe, image_index, prompt_points, prompt_boxes,
                                               upsample)
            chunk_logits.append(logits.view(num_images, k, size, size))  # B x k x S x S
            chunk_iou.append(iou.view(num_images, k))  # B x k
        if len(chunk_logits) == 1:
            return chunk_logits[0], chunk_iou[0]
        return torch.cat(chunk_logits, dim=1), torch.cat(chunk_iou, dim=1)  # B x K x S x S, B x K

    @staticmethod
    def _gather_prompts(points: torch.Tensor | None, point_labels: torch.Tensor | None, boxes: torch.Tensor | None,
                        image_index: torch.Tensor, instance_index: torch.Tensor
                        ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
        """The prompts of instances (image_index[n], instance_index[n]) in SAM's pixel-index
        convention: ((coords N x P x 2, labels N x P) or None, boxes N x 4 or None)."""
        prompt_points = None
        if points is not None:
            coords = points[image_index, instance_index] - 0.5  # N x P x 2, SAM adds the half pixel back
            prompt_points = (coords, point_labels[image_index, instance_index])  # N x P
        prompt_boxes = None if boxes is None else boxes[image_index, instance_index] - 0.5  # N x 4
        return prompt_points, prompt_boxes

    def _decode_prompts(self, features: torch.Tensor, image_pe: torch.Tensor, image_index: torch.Tensor,
                        prompt_points: tuple[torch.Tensor, torch.Tensor] | None,
                        prompt_boxes: torch.Tensor | None, upsample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder + upsampling for N prompts (image `image_index[n]` each):
        (logits N x S x S float32, iou N float32); without `upsample` the logits are the
        decoder's N x S/4 x S/4."""
        sparse, dense = self.prompt_encoder(points=prompt_points, boxes=prompt_boxes, masks=None)
        low_res, iou_pred = self.mask_decoder(features, image_index, image_pe, sparse, dense)
        if not upsample:
            return low_res[:, 0].float(), iou_pred[:, 0].float()  # N x S/4 x S/4, N
        # low_res is N x 1 x S/4 x S/4 (features are checked to be S/16): bilinear 4x to the canvas,
        # Triton on CUDA (an atomic-free backward), F.interpolate elsewhere
        upsampled = resam_kernels.upsample4x(low_res.float(), use_triton=low_res.is_cuda)  # N x 1 x S x S
        return upsampled[:, 0], iou_pred[:, 0].float()

    def forward(self, images: torch.Tensor, counts: torch.Tensor, points: torch.Tensor | None = None,
                point_labels: torch.Tensor | None = None, boxes: torch.Tensor | None = None,
                max_instances: int = 50, *, min_chunks: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """encode + decode: (logits B x K x S x S, iou B x K, features B x 256 x S/16 x S/16)."""
        features = self.encode(images)
        logits, iou = self.decode(features, counts, points, point_labels, boxes, max_instances,
                                  min_chunks=min_chunks)
        return logits, iou, features

    def _check_prompts(self, features: torch.Tensor, counts: torch.Tensor, points: torch.Tensor | None,
                       point_labels: torch.Tensor | None, boxes: torch.Tensor | None) -> int:
        """Validate prompt shapes; returns (K, the smallest count: K when no instance is padding)."""
        num_images = features.shape[0]
        side = self.image_size // self.feature_stride
        if features.dim() != 4 or tuple(features.shape[1:]) != (self.embed_dim, side, side):
            raise ValueError(f"features must be B x {self.embed_dim} x {side} x {side}, "
                             f"got {tuple(features.shape)}")
        if points is None and boxes is None:
            raise ValueError("decode needs points (with point_labels), boxes, or both")
        if (points is None) != (point_labels is None):
            raise ValueError("points and point_labels must be given together")
        num_instances = None
        if points is not None:
            if points.dim() != 4 or points.shape[0] != num_images or points.shape[-1] != 2:
                raise ValueError(f"points must be B x K x P x 2 with B={num_images}, got {tuple(points.shape)}")
            if tuple(point_labels.shape) != tuple(points.shape[:3]):
                raise ValueError(f"point_labels must be B x K x P = {tuple(points.shape[:3])}, "
                                 f"got {tuple(point_labels.shape)}")
            num_instances = points.shape[1]
        if boxes is not None:
            if boxes.dim() != 3 or boxes.shape[0] != num_images or boxes.shape[-1] != 4:
                raise ValueError(f"boxes must be B x K x 4 with B={num_images}, got {tuple(boxes.shape)}")
            if num_instances is not None and boxes.shape[1] != num_instances:
                raise ValueError(f"points give K={num_instances} instances but boxes give K={boxes.shape[1]}")
            num_instances = boxes.shape[1]
        if tuple(counts.shape) != (num_images,):
            raise ValueError(f"counts must have shape ({num_images},), got {tuple(counts.shape)}")
        if num_images == 0:
            return num_instances, 0
        low, high = torch.stack(torch.aminmax(counts)).tolist()  # one device-to-host transfer
        if high > num_instances or low < 0:
            raise ValueError(f"counts must lie in [0, K={num_instances}], got {counts.tolist()}")
        return num_instances, low
