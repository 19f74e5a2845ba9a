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
dicts, LoRA on `qkv` and official checkpoints are unchanged.

On CUDA tensors `SdpaAttention` does not build the augmented vectors: the Triton flash attention
`resam_kernels.relpos_attention` reads rel_h and rel_w directly and adds rel_h[i, row(j)] +
rel_w[i, col(j)] to each logit tile (no q'/k' copies, no one-hot columns, head size d instead
of d + H + W). `USE_TRITON_RELPOS = False` (module level) switches CUDA back to the augmented
`F.scaled_dot_product_attention` path; CPU always takes that path. The gathered tables
`relative_position_table(...)` are cached per layer while rel_pos_h / rel_pos_w do not require
grad (frozen under LoRA), keyed on the parameter's version counter, storage, dtype, device and
the grid size: an in-place update through the parameter (`copy_`, `load_state_dict`, optimiser
steps) invalidates it, one through `param.data` does not (`clear_relative_position_cache`).

The mask decoder gets the same treatment (it runs once per prompt, 200 prompts per step of 4
images with 50 instances, so its elementwise work is as large as the encoder's):
- `SdpaDecoderAttention`: the two-way transformer's attention (no relative positions) through
  `F.scaled_dot_product_attention`, without materialising the heads-separated copies and the
  attention matrix; with at most `FEW_KEYS` keys (image tokens attending to the handful of prompt
  tokens) the attention matrix is smaller than the queries and is computed explicitly (softmax in
  float32), since a fused kernel pads the keys to its block size (on an H200 cuDNN's took ~4 ms
  per call for 200 prompts x 4096 queries x 7 keys);
  `attend(..., q_pe=, k_pe=)` takes a positional encoding added before the q or k projection as
  proj(x) + W pe (W pe computed once for all prompts), so `keys + key_pe` (N prompts x hw tokens
  x C) is neither written nor kept for the backward;
- `SharedKeysTwoWayBlock` / `SharedKeysTwoWayTransformer`: the two-way transformer block and
  its final attention passing the image positional encoding that way (SAM forms `keys + key_pe`
  three times per decode), and running the residual adds with their LayerNorms
  (`norm(x + residual)`, norm4 over N prompts x hw tokens x C) as one fused pass;
- `FusedLayerNorm2d`: `LayerNorm2d` (normalisation over channels of N x C x H x W) as one
  LayerNorm over the channel-last view, instead of SAM's six elementwise passes. On a
  channels-last input (the decoder's upscaling path) no copy is made. `forward_fused` also takes
  a bias to add first and a GELU to apply after (the decoder's upscaling: transposed conv bias,
  LayerNorm2d and GELU in one pass, `BatchedMaskDecoder._upscale_stage1`).

These LayerNorms go through `fused_layer_norm`: the Triton kernel of `resam_kernels.layer_norm`
on CUDA tensors, its torch reference (`F.layer_norm` in float32: for float32 tensors exactly
SAM's `nn.LayerNorm(x + residual)`) on any other device, Triton's interpreter
(`TRITON_INTERPRET=1`) included, so that the model's CPU tests and demo stay fast.

`set_attention(module, kind)` switches every such layer inside `module` between SAM's forward
("official") and these ("sdpa"); only classes change, never parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Attention
from segment_anything.modeling.transformer import Attention as DecoderAttention
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

from resam_kernels import layer_norm, relpos_attention

ATTENTION_KINDS = ("sdpa", "official")
FEW_KEYS = 16
"""`SdpaDecoderAttention` with at most this many keys (the image-to-token attention: the prompt's
output and prompt tokens) computes the attention explicitly instead of through a fused kernel."""

# CUDA: the Triton flash attention with relative-position bias (True) or the augmented SDPA path.
USE_TRITON_RELPOS = True


def relative_position_table(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """SAM's `get_rel_pos` (the same values): the table rel_pos (L x d, linearly resized to
    2 max(q, k) - 1 rows if needed) gathered at every (query, key) offset -> q_size x k_size x d.

    SAM builds the gather index on the CPU, so every call on a CUDA model copies it to the device
    and synchronises with the host (48 times per ViT-B training step); here it is built on the
    table's device."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist,
                                mode="linear")  # 1 x d x max_rel_dist
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)  # max_rel_dist x d
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)  # q x 1
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)  # 1 x k
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)  # q x k
    return rel_pos[relative_coords.long()]  # q x k x d


def augmented_sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                             rel_w: torch.Tensor, grid_w: int, scale: float) -> torch.Tensor:
    """softmax(scale q k^T + rel_h[i, row(j)] + rel_w[i, col(j)]) v through
    `F.scaled_dot_product_attention` on the augmented vectors q' = [scale q, rel_h, rel_w] and
    k' = [k, onehot(row), onehot(col)] (see the module docstring). q, k, v B x heads x N x d,
    rel_h B x heads x N x H, rel_w B x heads x N x W (N = H W, W = grid_w) -> B x heads x N x d."""
    batch, heads, tokens, head_dim = q.shape
    height = rel_h.shape[-1]
    key_rows = torch.arange(tokens, device=q.device) // grid_w  # N
    key_cols = torch.arange(tokens, device=q.device) % grid_w  # N
    row_onehot = F.one_hot(key_rows, height).to(q.dtype)  # N x H
    col_onehot = F.one_hot(key_cols, grid_w).to(q.dtype)  # N x W
    padding = (-(head_dim + height + grid_w)) % 8  # fused kernels want a head size multiple of 8
    zeros = q.new_zeros(()).expand(batch, heads, tokens, padding)  # B x heads x N x pad, no storage
    # one copy each, padding included: B x heads x N x (d + H + W + pad)
    q_aug = torch.cat([q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype), zeros], dim=-1)
    k_aug = torch.cat([k, row_onehot.expand(batch, heads, -1, -1), col_onehot.expand(batch, heads, -1, -1),
                       zeros], dim=-1)
    return F.scaled_dot_product_attention(q_aug, k_aug, v, scale=1.0)  # B x heads x N x d


def _cached_table(module: nn.Module, name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    """`relative_position_table(size, size, param)` in `dtype` for the parameter `name` of
    `module`, cached on the module while the parameter does not require grad."""
    param = getattr(module, name)
    if param.requires_grad:
        return relative_position_table(size, size, param).to(dtype)
    key = (param._version, param.data_ptr(), param.dtype, param.device, size, dtype)
    cache = module.__dict__.setdefault("_relative_table_cache", {})
    cached = cache.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            table = relative_position_table(size, size, param).to(dtype)
        if torch.is_inference_mode_enabled():
            return table  # an inference tensor: not cached, autograd could not save it in a later training step
        # the entry holds the parameter's storage (a few KB), so that no other tensor can take its
        # address while the key refers to it
        cached = (key, table, param.detach())
        cache[name] = cached
    return cached[1]


def clear_relative_position_cache(module: nn.Module) -> None:
    """Drop the cached relative-position tables of every attention layer inside `module`."""
    for layer in module.modules():
        layer.__dict__.pop("_relative_table_cache", None)


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
            rel_rows = _cached_table(self, "rel_pos_h", height, q.dtype)  # H x H x d (query row, key row)
            rel_cols = _cached_table(self, "rel_pos_w", width, q.dtype)  # W x W x d
            grid_q = q.reshape(batch, heads, height, width, head_dim)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_rows)  # B x heads x H x W x H
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_cols)  # B x heads x H x W x W
            rel_h = rel_h.reshape(batch, heads, tokens, height)  # B x heads x N x H
            rel_w = rel_w.reshape(batch, heads, tokens, width)  # B x heads x N x W
            if q.is_cuda and USE_TRITON_RELPOS:  # the Triton kernel, on q's device
                out = relpos_attention(q, k, v, rel_h, rel_w, width, self.scale)  # B x heads x N x d
            else:
                out = augmented_sdpa_attention(q, k, v, rel_h, rel_w, width, self.scale)  # B x heads x N x d
        out = out.view(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)  # B x H x W x heads x d
        return self.proj(out.reshape(batch, height, width, -1))


class SdpaDecoderAttention(DecoderAttention):
    """The mask decoder's attention (same parameters) through `F.scaled_dot_product_attention`.

    `attend(q, k, v, q_pe=..., k_pe=...)` is `forward(q + q_pe, k + k_pe, v)` without forming the
    sums: a projection is linear, so proj(x + pe) = proj(x) + W pe, and W pe is computed once for
    a positional encoding shared by all prompts (stride 0 over them). The N x hw x C sum
    `keys + key_pe` is then neither written nor kept for the backward (the projection keeps
    `keys`, which is kept anyway)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attend(q, k, v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_pe: torch.Tensor | None = None,
               k_pe: torch.Tensor | None = None) -> torch.Tensor:
        q = _project(self.q_proj, q, q_pe)  # B x Nq x heads d
        k = _project(self.k_proj, k, k_pe)  # B x Nk x heads d
        v = self.v_proj(v)  # B x Nk x heads d
        if k.shape[1] <= FEW_KEYS:
            return self.out_proj(self._few_keys_attention(q, k, v))  # B x Nq x C
        q = self._separate_heads(q, self.num_heads)  # B x heads x Nq x d
        k = self._separate_heads(k, self.num_heads)  # B x heads x Nk x d
        v = self._separate_heads(v, self.num_heads)  # B x heads x Nk x d
        out = F.scaled_dot_product_attention(q, k, v)  # B x heads x Nq x d, scale 1/sqrt(d) as SAM's
        return self.out_proj(self._recombine_heads(out))  # B x Nq x C

    def _few_keys_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Projected q B x Nq x (heads d), k and v B x Nk x (heads d) -> B x Nq x (heads d).

        For the image-to-token attention (Nq = hw image tokens, Nk = a few prompt tokens),
        without separating heads: with block-diagonal key and value matrices (heads d x heads Nk
        and heads Nk x heads d, small) every head's logits and outputs come from one batched
        matmul on the queries' own layout, and the output is already in the layout `out_proj`
        takes. The attention matrix (B x Nq x heads Nk) is smaller than q; fused kernels would
        pad the keys to their block size."""
        heads = self.num_heads
        batch, num_keys, inner = k.shape
        num_queries, head_dim = q.shape[1], inner // heads
        eye = torch.eye(heads, dtype=k.dtype, device=k.device)  # heads x heads
        k_heads = k.view(batch, num_keys, heads, head_dim) * head_dim ** -0.5  # scaled as SAM's logits
        k_block = torch.einsum("bshd,hg->bhdgs", k_heads, eye).reshape(batch, inner, heads * num_keys)
        v_block = torch.einsum("bshd,hg->bhsgd", v.view(batch, num_keys, heads, head_dim), eye)
        v_block = v_block.reshape(batch, heads * num_keys, inner)  # B x heads Nk x heads d
        logits = (q @ k_block).view(batch, num_queries, heads, num_keys)  # B x Nq x heads x Nk
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(v.dtype)  # B x Nq x heads x Nk
        return probs.view(batch, num_queries, heads * num_keys) @ v_block  # B x Nq x heads d


def _project(projection: nn.Linear, x: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
    """projection(x + pe) as projection(x) + W pe: x B x L x C, pe B x L x C (broadcastable; one
    encoding for the whole batch when its batch stride is 0) -> B x L x C'."""
    if pe is None:
        return projection(x)
    if pe.shape[0] > 1 and pe.stride(0) == 0:
        pe = pe[:1]  # 1 x L x C: the same for every batch entry
    return projection(x) + F.linear(pe, projection.weight)  # W pe without the bias (it is in projection(x))


def attend_with_pe(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                   q_pe: torch.Tensor | None = None, k_pe: torch.Tensor | None = None) -> torch.Tensor:
    """attention(q + q_pe, k + k_pe, v): through `SdpaDecoderAttention.attend` (no sums formed) or,
    for SAM's own attention, with the sums."""
    if isinstance(attention, SdpaDecoderAttention):
        return attention.attend(q, k, v, q_pe=q_pe, k_pe=k_pe)
    return attention(q=q if q_pe is None else q + q_pe, k=k if k_pe is None else k + k_pe, v=v)


def fused_layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                     residual: torch.Tensor | None = None, pre_bias: torch.Tensor | None = None,
                     gelu: bool = False) -> torch.Tensor:
    """act(LayerNorm(x + residual + pre_bias)) over the last dim (`resam_kernels.layer_norm`):
    Triton on CUDA tensors, the torch reference elsewhere (also under TRITON_INTERPRET=1)."""
    return layer_norm(x, weight, bias, eps, residual=residual, pre_bias=pre_bias, gelu=gelu, use_triton=x.is_cuda)


def add_and_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """norm(x + residual) (norm(x) without residual); one fused pass when `norm` is a plain
    `nn.LayerNorm` over the last dim, else the module itself."""
    if type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1:
        return fused_layer_norm(x, norm.weight, norm.bias, norm.eps, residual=residual)
    return norm(x if residual is None else x + residual)


class SharedKeysTwoWayBlock(TwoWayAttentionBlock):
    """SAM's two-way transformer block (same parameters, same values up to rounding) without
    forming `keys + key_pe` (N prompts x hw tokens x C, which SAM adds twice): both cross
    attentions take the positional encoding through `attend_with_pe`. The residual adds and
    their LayerNorms run as one pass each (`add_and_norm`); with SAM's own attention layers on
    the CPU (float32) the block is exactly SAM's."""

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
                key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # queries N x T x C (prompt tokens), keys N x hw x C (image tokens)
        if self.skip_first_layer_pe:
            queries = add_and_norm(self.norm1, self.self_attn(q=queries, k=queries, v=queries), None)
        else:
            q = queries + query_pe
            queries = add_and_norm(self.norm1, queries, self.self_attn(q=q, k=q, v=queries))
        q = queries + query_pe
        attn_out = attend_with_pe(self.cross_attn_token_to_image, q, keys, keys, k_pe=key_pe)  # N x T x C
        queries = add_and_norm(self.norm2, queries, attn_out)
        queries = add_and_norm(self.norm3, queries, self.mlp(queries))
        q = queries + query_pe
        attn_out = attend_with_pe(self.cross_attn_image_to_token, keys, q, queries, q_pe=key_pe)  # N x hw x C
        keys = add_and_norm(self.norm4, keys, attn_out)
        return queries, keys


class SharedKeysTwoWayTransformer(TwoWayTransformer):
    """SAM's two-way transformer (same parameters) whose final token-to-image attention takes the
    image positional encoding through `attend_with_pe` instead of forming `keys + image_pe`."""

    def forward(self, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # image_embedding N x C x h x w, image_pe (1 or N) x C x h x w, point_embedding N x T x C
        keys = image_embedding.flatten(2).permute(0, 2, 1)  # N x hw x C
        key_pe = image_pe.flatten(2).permute(0, 2, 1)  # (1 or N) x hw x C
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        q = queries + point_embedding
        attn_out = attend_with_pe(self.final_attn_token_to_image, q, keys, keys, k_pe=key_pe)  # N x T x C
        queries = add_and_norm(self.norm_final_attn, queries, attn_out)
        return queries, keys


class FusedLayerNorm2d(LayerNorm2d):
    """SAM's `LayerNorm2d` (same parameters) as one LayerNorm over channels (`fused_layer_norm`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: N x C x H x W
        return self.forward_fused(x)

    def forward_fused(self, x: torch.Tensor, pre_bias: torch.Tensor | None = None,
                      gelu: bool = False) -> torch.Tensor:
        """act(LayerNorm2d(x + pre_bias)): x N x C x H x W, pre_bias C (added to every pixel),
        act exact GELU with `gelu`. The channel-last view of a channels-last x is read in place;
        the result has channels-last strides."""
        normed = fused_layer_norm(x.permute(0, 2, 3, 1), self.weight, self.bias, self.eps, pre_bias=pre_bias,
                                  gelu=gelu)  # N x H x W x C
        return normed.permute(0, 3, 1, 2)  # N x C x H x W (channels-last strides)


_KINDS = {  # SAM's class -> (official, sdpa) forwards
    Attention: (Attention, SdpaAttention),
    DecoderAttention: (DecoderAttention, SdpaDecoderAttention),
    LayerNorm2d: (LayerNorm2d, FusedLayerNorm2d),
    TwoWayAttentionBlock: (TwoWayAttentionBlock, SharedKeysTwoWayBlock),
    TwoWayTransformer: (TwoWayTransformer, SharedKeysTwoWayTransformer),
}


def _sam_class(module: nn.Module) -> type | None:
    return next((base for base in _KINDS if isinstance(module, base)), None)


def set_attention(module: nn.Module, kind: str) -> None:
    """Switch every attention and LayerNorm2d inside `module` (a whole `PromptableSam`, or one of
    its parts) to `kind` ("sdpa" or "official") in place.

    Only the class (the forward) changes: parameters, buffers, hooks and LoRA layers stay."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")
    for layer in module.modules():
        base = _sam_class(layer)
        if base is not None:
            official, fused = _KINDS[base]
            layer.__class__ = fused if kind == "sdpa" else official


def attention_kind(module: nn.Module) -> str:
    """"sdpa" or "official": the forward that the attention and LayerNorm2d layers in `module` use."""
    fused = tuple(classes[1] for classes in _KINDS.values())
    kinds = {"sdpa" if isinstance(layer, fused) else "official"
             for layer in module.modules() if _sam_class(layer) is not None}
    if len(kinds) != 1:
        raise ValueError(f"the model mixes attention kinds {sorted(kinds)}")
    return kinds.pop()
