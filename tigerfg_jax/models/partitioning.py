"""Logical axis names of the model's parameters and the logical->mesh rule tables.

Every kernel, embedding and norm parameter is created through the helpers below, so it
carries logical axis names (`nn.LogicallyPartitioned`). Which mesh axis a logical name
lands on is decided by one rule table, picked by `config.mesh.param_sharding`:
data parallel vs FSDP vs tensor parallel is a config change, not a code change.

Logical names (a parameter never repeats one):
  embed   the width D of the stream a layer reads or writes (ViT, text, pooling).
  mlp     the hidden width of an MLP block.
  heads   attention heads.
  kv      the per-head width.
  vocab   token ids of the text embedding.
  proj    the retrieval embedding width E.
  norm    LayerNorm scale/bias (tiny: never sharded).
  None    dimensions not worth sharding (patch pixels, positions, slots).
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

LogicalNames = tuple[str | None, ...]

AXIS_NAMES = ("embed", "mlp", "heads", "kv", "vocab", "proj", "norm")

PARAM_SHARDINGS = ("replicated", "fsdp", "tensor")

_MESH_AXIS = {
    "replicated": {},
    # ZeRO-3 style: every large parameter is split along its width over the batch
    # axis; jit all-gathers it for the forward pass.
    "fsdp": {"embed": "data"},
    # Megatron style: MLP hidden units and attention heads split over 'model'.
    "tensor": {"mlp": "model", "heads": "model"},
}


def logical_axis_rules(param_sharding: str) -> tuple[tuple[str, str | None], ...]:
  """`((logical_name, mesh_axis | None), ...)` for `nn.logical_to_mesh_sharding`.

  Args:
    param_sharding: 'replicated' | 'fsdp' | 'tensor' (`config.mesh.param_sharding`).
  """
  if param_sharding not in _MESH_AXIS:
    raise ValueError(
        f"config.mesh.param_sharding={param_sharding!r}; expected one of "
        f"{PARAM_SHARDINGS}")
  table = _MESH_AXIS[param_sharding]
  return tuple((name, table.get(name)) for name in AXIS_NAMES)


def init(initializer: Callable, names: LogicalNames) -> Callable:
  """`initializer` whose output is boxed with the logical axis `names`."""
  return nn.with_logical_partitioning(initializer, names)


def dense(features: int, names: LogicalNames, *, dtype: jnp.dtype,
          use_bias: bool = True, name: str | None = None) -> nn.Dense:
  """`nn.Dense` with a `names`-annotated kernel `[in, features]` (float32 params).

  `names` are the kernel's two logical axes; the bias takes the second.
  """
  return nn.Dense(
      features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias,
      kernel_init=init(nn.initializers.xavier_uniform(), names),
      bias_init=init(nn.initializers.zeros, names[1:]), name=name)


def layer_norm(*, dtype: jnp.dtype, epsilon: float = 1e-6,
               name: str | None = None) -> nn.LayerNorm:
  """`nn.LayerNorm` with 'norm'-annotated scale and bias (float32 params)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
      scale_init=init(nn.initializers.ones, ("norm",)),
      bias_init=init(nn.initializers.zeros, ("norm",)), name=name)
