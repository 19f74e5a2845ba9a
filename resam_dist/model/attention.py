"""SAM's image-encoder attention through `F.scaled_dot_product_attention` (flash / memory-efficient).

SAM's `Attention` adds decomposed relative positions to the attention logits:

    logit[i, j] = scale q_i . k_j + q_i . Rh[row(i) - row(j)] + q_i . Rw[col(i) - col(j)]

and materialises the N x N logits (N = H W tokens; 4096 per global block of a 1024 px image, i.e.
12 x 4096 x 4096 values per image and head set, saved for the backward). The two relative terms
depend on the key only through its row and its column, so they fold into one dot product with
augmented vectors:

    q'_i = [scale q_i, rel_h[i, :], rel_w[i, :]]        d + H + W values
    k'_j = [k_j, onehot(row(j)), onehot(col(j))]        d + H + W values

with rel_h[i, r] = q_i . Rh[row(i) - r] and rel_w[i, c] = q_i . Rw[col(i) - c] (as SAM computes
them). Then q'_i . k'_j is exactly the logit above, and a fused attention kernel with scale 1 runs
without ever writing the N x N matrix; gradients reach q, k, v and the relative-position tables
through ordinary autograd. The result equals SAM's attention up to floating-point rounding.

`SdpaAttention` subclasses segment-anything's `Attention` without adding parameters, so state
dicts, LoRA on `qkv` and official checkpoints are unchanged; `set_attention` switches the blocks
of an encoder between the two forwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import nn

ATTENTION_KINDS = ("sdpa", "official")


class SdpaAttention(Attention):
    """SAM's attention (same parameters) with the relative positions folded into a fused kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        heads = self.num_heads
        tokens = height * width
        # qkv: 3 x B x heads x N x d
        qkv = self.qkv(x).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # B x heads x N x d each
        head_dim = q.shape[-1]
        if not self.use_rel_pos:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # B x heads x N x d
        else:
            rel_rows = get_rel_pos(height, height, self.rel_pos_h)  # H x H x d (query row, key row)
            rel_cols = get_rel_pos(width, width, self.rel_pos_w)  # W x W x d
            grid_q = q.reshape(batch, heads, height, width, head_dim)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_rows.to(q.dtype))  # B x heads x H x W x H
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_cols.to(q.dtype))  # B x heads x H x W x W
            key_rows = torch.arange(tokens, device=x.device) // width  # N
            key_cols = torch.arange(tokens, device=x.device) % width  # N
            row_onehot = F.one_hot(key_rows, height).to(q.dtype)  # N x H
            col_onehot = F.one_hot(key_cols, width).to(q.dtype)  # N x W
            extra = height + width
            padding = (-(head_dim + extra)) % 8  # fused kernels want a head size multiple of 8
            q_aug = torch.cat([q * self.scale, rel_h.reshape(batch, heads, tokens, height),
                               rel_w.reshape(batch, heads, tokens, width)], dim=-1)  # B x heads x N x (d + H + W)
            k_aug = torch.cat([k, row_onehot.expand(batch, heads, -1, -1),
                               col_onehot.expand(batch, heads, -1, -1)], dim=-1)  # B x heads x N x (d + H + W)
            if padding:
                q_aug, k_aug = F.pad(q_aug, (0, padding)), F.pad(k_aug, (0, padding))
            out = F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)  # B x heads x N x d
        out = out.view(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)  # B x H x W x heads x d
        return self.proj(out.reshape(batch, height, width, -1))


def set_attention(encoder: ImageEncoderViT, kind: str) -> None:
    """Switch every attention module of `encoder` to `kind` ("sdpa" or "official") in place.

    Only the class (the forward) changes: parameters, buffers, hooks and LoRA layers stay."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    new_class = SdpaAttention if kind == "sdpa" else Attention
    for module in encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = new_class


def attention_kind(encoder: nn.Module) -> str:
    """"sdpa" or "official": the attention forward the encoder's blocks use."""
    kinds = {"sdpa" if isinstance(m, SdpaAttention) else "official"
             for m in encoder.modules() if isinstance(m, Attention)}
    if len(kinds) != 1:
        raise ValueError(f"encoder mixes attention kinds {sorted(kinds)}")
    return kinds.pop()
