"""Item towers for text queries other than TIGER-FG's, and the text query tower's gate.

`config.model.item_fusion` picks the item side of text-query retrieval
(docs/ARCHITECTURE.md "Text queries"); 'tiger' and 'concat' are `towers.ItemTower`
('concat' is its CLIP-style mode: a global pooling of the image concatenated with the
pooled title). This module has the others, one `FusionItemTower` with a `fusion`:

  'text'         the title alone: pooled title -> Dense(E) -> L2 (the text-only two-tower
                 baseline).
  'image'        the image alone: MAP pooling of the patches -> Dense(E) -> L2.
  'beyond_text'  Beyond Text's attention modality fusion network: the title's token
                 states and the image's patch tokens, each projected to the ViT width
                 with a learned modality embedding, are read by a learned fusion query
                 through multi-head cross-attention (title padding masked), then a
                 residual MLP and Dense(E) -> L2. Also the item's text-only and
                 image-only embeddings, for the alignments of the query with each.
  'smar'         SMAR's item towers: text (pooled title), image (MAP) and multimodal
                 (each title token attends over the patches; residual MLP; mean over
                 the real title tokens) embeddings, each Dense(E) -> L2. The searched
                 vector is `concat(mm, text)` `[B, 2E]`: with the query's gated vector
                 `concat(a q, (1 - a) q)` (`gated_query`) one dot product is SMAR's
                 per-query choice `a <q, mm> + (1 - a) <q, text>`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tigerfg_jax.models import partitioning, pooling, text, transformer
from tigerfg_jax.models.normalize import l2_normalize, normalize_pixels

# The `FusionItemTower` fusions; `towers.ITEM_FUSIONS` adds 'tiger' and 'concat'.
FUSIONS = ("text", "image", "beyond_text", "smar")
# Fusions whose item tower returns single-modality embeddings (the `t2modal` term).
MODALITY_FUSIONS = ("beyond_text", "smar")


def gated_query(unit: jax.Array, gate: jax.Array) -> jax.Array:
  """SMAR's searched query `concat(a q, (1 - a) q)` `[B, 2E]` from `q` `[B, E]` and the
  gate `a` `[B, 1]` in (0, 1): its dot product with `concat(mm, text)` is
  `a <q, mm> + (1 - a) <q, text>`."""
  return jnp.concatenate([gate * unit, (1.0 - gate) * unit], axis=-1)


class FusionItemTower(nn.Module):
  """Item image + title -> float32 `[B, E']` for one of `FUSIONS` (module docstring).

  Attributes:
    fusion: one of FUSIONS.
    vision: the ViT (shared with the query tower; unused by 'text').
    text_encoder_kwargs: the title's `text.TextEncoder` attributes but dtype (unused
      by 'image').
    num_registers: R, to find the patches after CLS and the registers.
    num_heads, mlp_dim: the pooling / fusion attentions' heads and MLP width.
    embed_dim: E.
    pixel_mean, pixel_std: per-channel normalisation of 0..255 pixels.
    dtype: compute dtype.
  """
  fusion: str
  vision: nn.Module
  text_encoder_kwargs: dict[str, Any]
  num_registers: int
  num_heads: int
  mlp_dim: int
  embed_dim: int
  pixel_mean: Sequence[float]
  pixel_std: Sequence[float]
  dtype: Any = jnp.float32

  def setup(self):
    # Submodules are built lazily: a fusion creates the parameters of those it calls.
    self.text_encoder = text.TextEncoder(**self.text_encoder_kwargs, dtype=self.dtype)
    self.image_pool = pooling.MAPHead(self.num_heads, self.mlp_dim, dtype=self.dtype)
    width = self.vision.size.width
    self.title_to_image_width = partitioning.dense(width, (None, "embed"), dtype=self.dtype)
    self.fusion_attn = transformer.MultiHeadAttention(self.num_heads, dtype=self.dtype)
    self.fusion_norm = partitioning.layer_norm(dtype=self.dtype)
    self.fusion_mlp = transformer.MlpBlock(self.mlp_dim, dtype=self.dtype)
    projection = lambda: partitioning.dense(self.embed_dim, ("embed", "proj"),
                                            dtype=self.dtype)
    self.text_projection = projection()
    self.image_projection = projection()
    self.fusion_projection = projection()
    if self.fusion == "beyond_text":
      init = partitioning.init(nn.initializers.normal(0.02), (None, "embed"))
      self.modality_embed = self.param("modality_embed", init, (2, width), jnp.float32)
      self.fusion_query = self.param("fusion_query", init, (1, width), jnp.float32)

  def __call__(self, images: jax.Array, title_tokens: jax.Array, title_mask: jax.Array,
               region_mask: jax.Array | None = None,
               swap_titles: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embeds items.

    Args:
      images: uint8 `[B, S, S, 3]`.
      title_tokens: int32 `[B, L]`; title_mask: bool `[B, L]`, True on real tokens.
      region_mask: bool `[B, N]` or None: the patches the image attentions may read.
      swap_titles: must be 0 (title-swap negatives are the TIGER-FG tower's).

    Returns:
      `(item_emb [B, E'], aux)`, float32; E' = 2E for 'smar', else E. aux:
      'beyond_text' and 'smar': `item_text_emb`, `item_image_emb` `[B, E]` (L2);
      'smar' also `item_mm_emb` `[B, E]`; 'beyond_text' `fusion_attention` float32
      `[B, H, L + N]` (the fusion query's weights over title tokens, then patches).
    """
    if self.fusion not in FUSIONS:
      raise ValueError(f"config.model.item_fusion={self.fusion!r}: FusionItemTower "
                       f"builds {FUSIONS}")
    if swap_titles:
      raise ValueError(f"loss.hard_negatives={swap_titles}: title-swap negatives need "
                       "the TIGER-FG item tower (model.item_fusion='tiger')")
    aux: dict[str, jax.Array] = {}
    if self.fusion != "image":
      title, title_pooled = self.text_encoder(title_tokens, title_mask)
      text_emb = l2_normalize(self.text_projection(title_pooled))
      if self.fusion == "text":
        return text_emb, aux
    tokens = self.vision(normalize_pixels(images, self.pixel_mean, self.pixel_std,
                                          self.dtype))
    patches = tokens[:, 1 + self.num_registers:]
    image_pooled, _ = self.image_pool(patches, region_mask)
    image_emb = l2_normalize(self.image_projection(image_pooled))
    if self.fusion == "image":
      return image_emb, aux
    aux.update(item_text_emb=text_emb, item_image_emb=image_emb)
    batch, num_patches, width = patches.shape
    title = self.title_to_image_width(title)
    if self.fusion == "beyond_text":
      modality, query = self.modality_embed, self.fusion_query
      keys = jnp.concatenate([title + modality[0].astype(self.dtype),
                              patches + modality[1].astype(self.dtype)], axis=1)
      image_keys = (jnp.ones((batch, num_patches), bool) if region_mask is None
                    else region_mask)
      fused, weights = self.fusion_attn(
          jnp.broadcast_to(query.astype(self.dtype), (batch, 1, width)), keys,
          jnp.concatenate([title_mask, image_keys], axis=1))
      fused = fused + self.fusion_mlp(self.fusion_norm(fused))
      aux["fusion_attention"] = weights[:, :, 0, :]
      return l2_normalize(self.fusion_projection(fused[:, 0])), aux
    # 'smar': each title token reads the patches; then the mean over real tokens.
    read, _ = self.fusion_attn(title, patches, region_mask)
    mixed = title + read
    mixed = mixed + self.fusion_mlp(self.fusion_norm(mixed))
    weights = title_mask.astype(jnp.float32) / jnp.maximum(
        title_mask.sum(axis=1, keepdims=True), 1)
    mm = jnp.einsum("bl,bld->bd", weights, mixed.astype(jnp.float32)).astype(self.dtype)
    aux["item_mm_emb"] = l2_normalize(self.fusion_projection(mm))
    return jnp.concatenate([aux["item_mm_emb"], text_emb], axis=-1), aux
