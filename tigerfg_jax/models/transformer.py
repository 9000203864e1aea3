"""Transformer pieces shared by the ViT, the text encoder and the pooling heads.

Compute runs in `dtype` (float32 or bfloat16); parameters are float32; attention
logits and softmax are always float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tigerfg_jax.models import partitioning

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
  """`x * sigmoid(1.702 x)`: OpenAI CLIP's GELU approximation, which its weights need."""
  return x * jax.nn.sigmoid(1.702 * x)


# `config.model.mlp_activation` -> function. Exact GELU by default, as in the PyTorch
# ViTs whose weights `convert` imports.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": quick_gelu,
}


def masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
  """float32 softmax over the last axis, restricted to `mask`.

  Args:
    logits: `[..., K]`.
    mask: bool, broadcastable to `logits`; True where a key may be attended. A row
      with no True key gets the uniform distribution over all K keys (every logit
      is then the same float32 minimum), so an empty title or an empty box stays
      finite, with zero gradient to its logits.

  Returns:
    float32 `[..., K]`, rows sum to 1, exactly 0 outside the mask.
  """
  logits = logits.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


class MultiHeadAttention(nn.Module):
  """Multi-head attention of `queries` over `inputs` that also returns its weights.

  The output width is the queries' width; `inputs` may have another width (the
  pooling's slots attend over text tokens of the text encoder's width).
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, inputs: jax.Array,
               mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Attends.

    Args:
      queries: `[B, Q, D]`.
      inputs: `[B, K, Din]` keys and values.
      mask: bool `[B, K]` (the same keys for every query) or `[B, Q, K]` (per query,
        e.g. causal), True on keys that may be attended (None: all).

    Returns:
      `([B, Q, D] in dtype, float32 weights [B, H, Q, K])`.
    """
    width = queries.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"attention width {width} is not divisible by "
                       f"{self.num_heads} heads")
    head_dim = width // self.num_heads

    def heads(name: str, use_bias: bool = True) -> nn.DenseGeneral:
      return nn.DenseGeneral(
          (self.num_heads, head_dim), dtype=self.dtype, param_dtype=jnp.float32,
          use_bias=use_bias,
          kernel_init=partitioning.init(nn.initializers.xavier_uniform(),
                                        ("embed", "heads", "kv")),
          bias_init=partitioning.init(nn.initializers.zeros, ("heads", "kv")),
          name=name)

    query = heads("query")(queries) * head_dim**-0.5
    # No key bias: it adds the same logit to every key of a query, so the softmax
    # ignores it and its gradient is zero (a converted CLIP k-bias is dropped exactly).
    key = heads("key", use_bias=False)(inputs)
    value = heads("value")(inputs)
    # float32 accumulation: bfloat16 logits would round the softmax's inputs.
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                        preferred_element_type=jnp.float32)
    if mask is not None:  # -> [B, 1, Q or 1, K], broadcast over heads.
      mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    weights = masked_softmax(logits, mask)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), value)
    out = nn.DenseGeneral(
        width, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioning.init(nn.initializers.xavier_uniform(),
                                      ("heads", "kv", "embed")),
        bias_init=partitioning.init(nn.initializers.zeros, ("embed",)),
        name="out")(mixed)
    return out, weights


class MlpBlock(nn.Module):
  """Dense(mlp_dim) -> activation -> Dense(out_dim, default: the input width).

  `activation` names an entry of `ACTIVATIONS`.
  """
  mlp_dim: int
  out_dim: int | None = None
  activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., D] -> [..., out_dim]`."""
    out_dim = self.out_dim or x.shape[-1]
    x = partitioning.dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype,
                           name="fc1")(x)
    x = ACTIVATIONS[self.activation](x)
    return partitioning.dense(out_dim, ("mlp", "embed"), dtype=self.dtype,
                              name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  `activation` is the MLP's (`ACTIVATIONS`), `norm_eps` the LayerNorms' epsilon.
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`[B, T, D]` -> `[B, T, D]`; mask: bool `[B, T]` or `[B, T, T]` (keys to attend)."""
    norm = functools.partial(partitioning.layer_norm, dtype=self.dtype,
                             epsilon=self.norm_eps)
    y = norm(name="norm1")(x)
    y, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
        y, y, mask)
    x = x + y
    y = norm(name="norm2")(x)
    return x + MlpBlock(self.mlp_dim, activation=self.activation, dtype=self.dtype,
                        name="mlp")(y)


class Encoder(nn.Module):
  """`depth` pre-LN blocks and a final LayerNorm (options as in `EncoderBlock`)."""
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`[B, T, D]` -> `[B, T, D]`; mask: bool `[B, T]` or `[B, T, T]` (keys to attend)."""
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, activation=self.activation,
                       norm_eps=self.norm_eps, dtype=self.dtype,
                       name=f"block_{i}")(x, mask)
    return partitioning.layer_norm(dtype=self.dtype, epsilon=self.norm_eps,
                                   name="norm")(x)
