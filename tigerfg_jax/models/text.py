"""Title encoder: token + learned position embeddings, a pre-LN transformer with a
padding mask; bidirectional by default (every real token sees every other real
token), or causal as in CLIP.

The pooled vector is by default the mean over the real tokens (BOS and EOS included):
it needs no knowledge of the EOS id and treats every title length alike. CLIP pools
the end token instead ('eos'): titles are `BOS title EOS` then padding, so the last
real token is the EOS. Padded positions never reach a real token (their keys are
masked) nor the pooled vector. An optional bias-free projection (CLIP's
`text_projection`) follows the pooling.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tigerfg_jax.models import partitioning, transformer

# `config.model.text_pool`: the mean over the real tokens | the last real token.
POOLS = ("mean", "eos")

_VARIANTS = {
    "mu": dict(width=32, depth=2, mlp_dim=64, num_heads=2),
    "pico": dict(width=64, depth=2, mlp_dim=256, num_heads=2),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    # CLIP's text transformer, so that `convert` can import its weights.
    "B": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
}


def decode_text_variant(name: str) -> dict[str, int]:
  """Text transformer size by name: 'mu' (tests), 'pico' (CPU default), 'S', 'B'.

  Returns:
    `dict(width, depth, mlp_dim, num_heads)`.
  """
  if name not in _VARIANTS:
    raise ValueError(f"config.model.text_variant={name!r}: unknown text size; "
                     f"expected one of {sorted(_VARIANTS)}")
  return dict(_VARIANTS[name])


class TextEncoder(nn.Module):
  """Transformer over title token ids.

  Attributes:
    variant: size name for `decode_text_variant`.
    vocab_size: token ids are in `[0, vocab_size)`; must be > 0.
    max_len: longest title (tokens incl. BOS/EOS) the position table covers.
    causal: each token attends only to itself and the real tokens before it.
    pool: 'mean' over the real tokens | 'eos' (the last real token).
    proj_dim: > 0: a bias-free Dense to this width after the pooling; 0: none.
    activation: the MLPs' activation (`transformer.ACTIVATIONS`).
    norm_eps: epsilon of every LayerNorm here.
    attention: self-attention kind (`transformer.ATTENTION_KINDS`).
    remat: the blocks' remat policy (`transformer.REMAT_POLICIES`).
    dtype: compute dtype.
  """
  variant: str
  vocab_size: int
  max_len: int
  causal: bool = False
  pool: str = "mean"
  proj_dim: int = 0
  activation: str = "gelu"
  norm_eps: float = 1e-6
  attention: str = "dot_product"
  remat: str = "none"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array,
               mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes titles.

    Args:
      tokens: int32 `[B, L]`, L <= max_len.
      mask: bool `[B, L]`, True on real tokens, which come first (right padding).

    Returns:
      `(tokens [B, L, Dt], pooled [B, P])` in dtype, P = proj_dim or Dt; pooled
      (before the projection) is zeros for an empty title.
    """
    if self.vocab_size <= 0:
      raise ValueError(
          f"config.model.vocab_size={self.vocab_size}: must be > 0 (set it from "
          "the tokenizer's vocabulary size)")
    length = tokens.shape[1]
    if length > self.max_len:
      raise ValueError(f"title length {length} > config.model.max_title_len="
                       f"{self.max_len}")
    size = decode_text_variant(self.variant)
    embed = nn.Embed(
        self.vocab_size, size["width"], dtype=self.dtype, param_dtype=jnp.float32,
        embedding_init=partitioning.init(nn.initializers.normal(0.02),
                                         ("vocab", "embed")),
        name="token_embed")
    position = self.param(
        "pos_embedding",
        partitioning.init(nn.initializers.normal(0.01), (None, "embed")),
        (self.max_len, size["width"]), jnp.float32)
    x = embed(tokens) + position[:length].astype(self.dtype)
    # Causal: query i reads the real keys j <= i.
    x = transformer.Encoder(size["depth"], size["num_heads"], size["mlp_dim"],
                            activation=self.activation, norm_eps=self.norm_eps,
                            attention=self.attention, causal=self.causal,
                            remat=self.remat, dtype=self.dtype, name="encoder")(x, mask)
    count = mask.sum(axis=1)
    if self.pool == "eos":
      last = jnp.take_along_axis(x, jnp.maximum(count - 1, 0)[:, None, None], axis=1)
      pooled = jnp.where(count[:, None] > 0, last[:, 0], 0)
    else:
      weights = mask.astype(jnp.float32) / jnp.maximum(count, 1)[:, None]
      pooled = jnp.einsum("bl,bld->bd", weights, x.astype(jnp.float32))
    pooled = pooled.astype(self.dtype)
    if self.proj_dim:
      pooled = partitioning.dense(self.proj_dim, ("embed", "proj"), dtype=self.dtype,
                                  use_bias=False, name="projection")(pooled)
    return x, pooled
