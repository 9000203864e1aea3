"""The towers' two normalisations: pixels in, embeddings out."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def normalize_pixels(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                     dtype: Any) -> jax.Array:
  """uint8 or float 0..255 `[B, S, S, 3]` -> `(x - mean) / std` in dtype."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return ((images.astype(jnp.float32) - mean) / std).astype(dtype)


def l2_normalize(x: jax.Array) -> jax.Array:
  """float32 `[..., E]` rows of unit L2 norm (a zero row stays zero)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))
