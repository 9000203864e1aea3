"""Transformer pieces shared by the ViT, the text encoder and the pooling heads.

Compute runs in `dtype` (float32 or bfloat16); parameters are float32; attention
logits and softmax are always float32.

The encoders' self-attention runs through `jax.nn.dot_product_attention` ('dot_product',
`implementation=None`: JAX's choice of kernel; jax 0.10.2 still picks its XLA version on
every platform) or through explicit einsums ('einsum', the reference that also returns
the weights, which the pooling heads need).
Their blocks can be rematerialised (`REMAT_POLICIES`) without changing the parameter
tree, so a checkpoint trained under one policy restores under any other.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tigerfg_jax.models import partitioning

Dtype = Any

# `config.model.attention`: how the encoders' self-attention is computed.
ATTENTION_KINDS = ("dot_product", "einsum")

# `config.model.remat`: what the backward pass of an encoder block keeps from its
# forward pass ('none': everything; the others recompute the rest).
REMAT_POLICIES = ("none", "full", "dots", "names")

# Intermediates the 'names' policy saves (`jax.ad_checkpoint.checkpoint_name`): the
# attention's mixed values before the output projection, and the MLP's hidden layer
# before its activation.
SAVED_NAMES = ("attention_mixed", "mlp_hidden")

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # Keeps the outputs of the Dense layers (q/k/v, out, fc1, fc2: O(T D) each) and
    # recomputes the batched attention einsums, whose [B, H, T, T] logits are the
    # largest activations of a block ('dots_saveable' would keep those too).
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES),
}


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
  """Multi-head attention of `queries` over `inputs`.

  The output width is the queries' width; `inputs` may have another width (the
  pooling's slots attend over text tokens of the text encoder's width).

  Attributes:
    num_heads: H.
    dtype: compute dtype.
    kind: 'einsum' (explicit softmax; returns the weights) | 'dot_product'
      (`jax.nn.dot_product_attention`; returns no weights). Same parameters.
    causal: query i attends only to keys j <= i (self-attention, Q == K).
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  kind: str = "einsum"
  causal: bool = False

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
      `([B, Q, D] in dtype, float32 weights [B, H, Q, K])`; weights None for
      kind='dot_product'.
    """
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"config.model.attention={self.kind!r}; expected one of "
                       f"{ATTENTION_KINDS}")
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
    if mask is not None:  # -> [B, 1, Q or 1, K], broadcast over heads.
      mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    weights = None
    if self.kind == "dot_product":
      # The query is already scaled. Logits and softmax are float32 inside; a row with
      # no key is uniform there too (every logit gets the same large negative value).
      mixed = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=1.0,
                                           is_causal=self.causal)
    else:
      if self.causal:
        causal = jnp.tril(jnp.ones((queries.shape[1], inputs.shape[1]), bool))
        mask = causal if mask is None else mask & causal
      # float32 accumulation: bfloat16 logits would round the softmax's inputs.
      logits = jnp.einsum("bqhd,bkhd->bhqk", query, key,
                          preferred_element_type=jnp.float32)
      weights = masked_softmax(logits, mask)
      mixed = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), value)
    mixed = checkpoint_name(mixed, "attention_mixed")
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
    x = checkpoint_name(x, "mlp_hidden")
    x = ACTIVATIONS[self.activation](x)
    return partitioning.dense(out_dim, ("mlp", "embed"), dtype=self.dtype,
                              name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  `activation` is the MLP's (`ACTIVATIONS`), `norm_eps` the LayerNorms' epsilon,
  `attention` one of `ATTENTION_KINDS`, `causal` as in `MultiHeadAttention`.
  `layer_scale`: None (off, no parameters), or the initial value of a learned
  per-channel scale `[D]` on each branch before its residual add (CaiT / DINOv2
  LayerScale: x + ls1 * Attn(LN(x)), then x + ls2 * MLP(LN(x))).
  """
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  norm_eps: float = 1e-6
  attention: str = "dot_product"
  causal: bool = False
  layer_scale: float | None = None
  dtype: Dtype = jnp.float32

  def _scaled(self, y: jax.Array, name: str) -> jax.Array:
    if self.layer_scale is None:
      return y
    scale = self.param(name, partitioning.init(nn.initializers.constant(self.layer_scale),
                                               ("norm",)), (y.shape[-1],), jnp.float32)
    return y * scale.astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`[B, T, D]` -> `[B, T, D]`; mask: bool `[B, T]` or `[B, T, T]` (keys to attend)."""
    norm = functools.partial(partitioning.layer_norm, dtype=self.dtype,
                             epsilon=self.norm_eps)
    y = norm(name="norm1")(x)
    y, _ = MultiHeadAttention(self.num_heads, dtype=self.dtype, kind=self.attention,
                              causal=self.causal, name="attn")(y, y, mask)
    x = x + self._scaled(y, "ls1")
    y = norm(name="norm2")(x)
    y = MlpBlock(self.mlp_dim, activation=self.activation, dtype=self.dtype, name="mlp")(y)
    return x + self._scaled(y, "ls2")


def remat_block(policy: str) -> type[EncoderBlock]:
  """`EncoderBlock`, rematerialised under `policy` (one of `REMAT_POLICIES`).

  The wrapped class keeps the block's parameter names, so the tree is the same for
  every policy.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat={policy!r}; expected one of {REMAT_POLICIES}")
  if policy == "none":
    return EncoderBlock
  return nn.remat(EncoderBlock, policy=_REMAT[policy])


class Encoder(nn.Module):
  """`depth` pre-LN blocks and a final LayerNorm.

  Options as in `EncoderBlock`; `remat` is the blocks' policy (`remat_block`).
  """
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str = "gelu"
  norm_eps: float = 1e-6
  attention: str = "dot_product"
  causal: bool = False
  layer_scale: float | None = None
  remat: str = "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """`[B, T, D]` -> `[B, T, D]`; mask: bool `[B, T]` or `[B, T, T]` (keys to attend)."""
    block = remat_block(self.remat)
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, activation=self.activation,
                norm_eps=self.norm_eps, attention=self.attention, causal=self.causal,
                layer_scale=self.layer_scale, dtype=self.dtype, name=f"block_{i}")(x, mask)
    return partitioning.layer_norm(dtype=self.dtype, epsilon=self.norm_eps,
                                   name="norm")(x)
