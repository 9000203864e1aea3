"""Attention pooling heads: `TextGuidedPooling` (TIGER-FG's item pooling) and `MAPHead`.

Both read tokens that already went through their encoder's final LayerNorm, and both
take an optional `region_mask` bool `[B, N]` that restricts their attention over the
patches to those positions (the privileged teacher pools from the ground-truth box).
A row with no True entry attends uniformly to all patches
(`transformer.masked_softmax`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tigerfg_jax.models import partitioning, transformer


class TextGuidedPooling(nn.Module):
  """The title decides where the item embedding looks.

  1. K learnable slot queries cross-attend to the title tokens (padding masked), then
     to the patches: text-conditioned visual slots.
  2. An MLP scores each slot; the softmax over slots weighs them into the semantic
     feature `f_m`.
  3. The appearance query `LN(cls) + MLP(f_m)` attends over the patches (multi-head):
     its output is the appearance feature `f_a`, its weights the patch attention map
     (the implicit grounding; no box is needed at inference).

  Attributes:
    num_slots: K.
    num_heads: H of every attention here.
    mlp_dim: hidden width of the MLPs.
    dtype: compute dtype.
  """
  num_slots: int
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, cls: jax.Array, patches: jax.Array, text_tokens: jax.Array,
               text_mask: jax.Array, region_mask: jax.Array | None = None,
               title_slots: jax.Array | None = None) -> dict[str, jax.Array]:
    """Pools the patches under the title's guidance (or under T titles each).

    Args:
      cls: `[B, D]` the image's CLS token.
      patches: `[B, N, D]` patch tokens.
      text_tokens: `[B, L, Dt]` title tokens, or `[B, T, L, Dt]`: T titles per image,
        each pooled on its own; the patches' keys and values are projected once.
      text_mask: bool `[B, L]` (or `[B, T, L]`), True on real title tokens.
      region_mask: bool `[B, N]` or None; patches the visual attentions may read.
      title_slots: `[B, T * K, D]` or None: step 1's title reading, as an earlier
        call over the same titles returned it (it does not depend on the image).

    Returns:
      dict with `f_a` `[B, D]` and `f_m` `[B, D]` (dtype), `slot_weights` float32
      `[B, K]`, `attention` float32 `[B, H, N]` (the `f_a` pooling's map, rows sum
      to 1 over N) and `title_slots` `[B, T * K, D]`; with T titles each but
      `title_slots` gets a T axis after B (`attention`: `[B, H, T, N]`).
    """
    several = text_tokens.ndim == 4
    if not several:
      text_tokens, text_mask = text_tokens[:, None], text_mask[:, None]
    batch, _, width = patches.shape
    titles, length = text_mask.shape[1:]
    norm = functools.partial(partitioning.layer_norm, dtype=self.dtype)
    attend = functools.partial(transformer.MultiHeadAttention, self.num_heads,
                               dtype=self.dtype)

    if title_slots is None:
      slots = self.param(
          "slots", partitioning.init(nn.initializers.normal(0.02), (None, "embed")),
          (self.num_slots, width), jnp.float32)
      slots = jnp.broadcast_to(slots.astype(self.dtype),
                               (batch * titles, self.num_slots, width))
      read_title, _ = attend(name="title_attn")(
          norm(name="title_norm")(slots),
          text_tokens.reshape(batch * titles, length, -1),
          text_mask.reshape(batch * titles, length))
      # [B, T * K, D]: every title's slots query the same patches in one attention.
      title_slots = (slots + read_title).reshape(batch, titles * self.num_slots, width)
    slots = title_slots
    read_image, _ = attend(name="slot_image_attn")(
        norm(name="slot_image_norm")(slots), patches, region_mask)
    slots = slots + read_image
    slot_mlp = transformer.MlpBlock(self.mlp_dim, dtype=self.dtype, name="slot_mlp")
    slots = slots + slot_mlp(norm(name="slot_mlp_norm")(slots))
    slots = norm(name="slot_out_norm")(slots).reshape(batch, titles, self.num_slots, width)

    hidden = partitioning.dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype,
                                name="slot_score_hidden")(slots)
    # No bias: the softmax over slots ignores a shared offset.
    scores = partitioning.dense(1, ("mlp", None), dtype=self.dtype, use_bias=False,
                                name="slot_score")(nn.gelu(hidden, approximate=False))
    slot_weights = jax.nn.softmax(scores[..., 0].astype(jnp.float32), axis=-1)
    f_m = jnp.einsum("btk,btkd->btd", slot_weights.astype(self.dtype), slots)

    query = norm(name="cls_norm")(cls)[:, None, :] + transformer.MlpBlock(
        self.mlp_dim, dtype=self.dtype, name="query_mlp")(f_m)
    f_a, weights = attend(name="appearance_attn")(query, patches, region_mask)
    pooled = dict(f_a=f_a, f_m=f_m, slot_weights=slot_weights, attention=weights,
                  title_slots=title_slots)
    if several:
      return pooled
    return dict(f_a=f_a[:, 0], f_m=f_m[:, 0], slot_weights=slot_weights[:, 0],
                attention=weights[:, :, 0, :], title_slots=title_slots)


class MAPHead(nn.Module):
  """Multi-head attention pooling with a learned probe (big_vision's MAP head).

  Attributes:
    num_heads: H.
    mlp_dim: hidden width of the residual MLP after the pooling.
    dtype: compute dtype.
  """
  num_heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`[B, N, D]` tokens (mask: bool `[B, N]`) -> (`[B, D]`, float32 `[B, H, N]`)."""
    batch, _, width = tokens.shape
    probe = self.param(
        "probe", partitioning.init(nn.initializers.xavier_uniform(), (None, "embed")),
        (1, width), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (batch, 1, width))
    x, weights = transformer.MultiHeadAttention(
        self.num_heads, dtype=self.dtype, name="attn")(probe, tokens, mask)
    y = partitioning.layer_norm(dtype=self.dtype, name="norm")(x)
    x = x + transformer.MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)
    return x[:, 0], weights[:, :, 0, :]
