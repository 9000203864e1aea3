"""Query flip and colour jitter on the accelerator, inside the jitted train step.

With `data.device_augment` the input pipeline only crops the training queries
(`augment.augment_query(..., flip_and_jitter=False)`) and the step calls
`augment_queries(batch, rng)`: the same augmentation as the host's (horizontal flip with
p=0.5, then `augment.color_jitter`'s brightness, contrast and saturation factors drawn
uniformly in [1 - strength, 1 + strength]), per example, as uint8 in and uint8 out, so
the batch keeps the dtypes of docs/ARCHITECTURE.md ("Batches") and the model normalises
as before. Pure functions of the batch and an explicit PRNG key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# ITU-R 601 luma weights, as augment.color_jitter.
_LUMA = (0.299, 0.587, 0.114)


def draw(rng: jax.Array, batch_size: int, strength: float = 0.25) -> tuple[jax.Array, jax.Array]:
  """Per-example flips bool `[B]` and factors float32 `[B, 3]` (brightness, contrast,
  saturation)."""
  flip_key, factor_key = jax.random.split(rng)
  flip = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
  factors = jax.random.uniform(factor_key, (batch_size, 3), jnp.float32,
                               1 - strength, 1 + strength)
  return flip, factors


def flip_and_jitter(images: jax.Array, flip: jax.Array, factors: jax.Array) -> jax.Array:
  """uint8 `[B, H, W, 3]` -> uint8 `[B, H, W, 3]`: each image mirrored where `flip`,
  then scaled by its brightness, contrast (about its mean) and saturation (about its
  grey) factors, rounded half up and clipped to 0..255."""
  x = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images).astype(jnp.float32)
  x = x * factors[:, 0, None, None, None]
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  x = mean + (x - mean) * factors[:, 1, None, None, None]
  gray = (x @ jnp.asarray(_LUMA, jnp.float32))[..., None]
  x = gray + (x - gray) * factors[:, 2, None, None, None]
  return jnp.clip(jnp.floor(x + 0.5), 0, 255).astype(jnp.uint8)


def augment_queries(batch: dict[str, Any], rng: jax.Array,
                    strength: float = 0.25) -> dict[str, Any]:
  """The batch with `query_image` (uint8 `[B, Sq, Sq, 3]`) flipped and jittered."""
  images = batch["query_image"]
  flip, factors = draw(rng, images.shape[0], strength)
  return {**batch, "query_image": flip_and_jitter(images, flip, factors)}
