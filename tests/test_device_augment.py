"""Tests of the on-device query flip and colour jitter (tigerfg_jax/data/device_augment.py)."""

from __future__ import annotations

import jax
import numpy as np
from PIL import Image

from tigerfg_jax.data import augment, device_augment


def _reference(images: np.ndarray, flip: np.ndarray, factors: np.ndarray) -> np.ndarray:
  """float64 NumPy: flip, brightness, contrast about the mean, saturation about grey."""
  out = []
  for image, f, (b, c, s) in zip(images.astype(np.float64), flip, factors.astype(np.float64)):
    x = (image[:, ::-1] if f else image) * b
    x = x.mean() + (x - x.mean()) * c
    gray = (x @ np.asarray([0.299, 0.587, 0.114]))[..., None]
    x = gray + (x - gray) * s
    out.append(np.clip(np.floor(x + 0.5), 0, 255))
  return np.asarray(out)


def _images(count=6, side=12, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, side, side, 3), dtype=np.uint8)


def test_matches_the_float64_reference():
  images = _images()
  flip, factors = device_augment.draw(jax.random.PRNGKey(3), len(images), strength=0.4)
  flip, factors = np.asarray(flip), np.asarray(factors)
  assert flip.any() and not flip.all()
  assert ((factors >= 0.6) & (factors <= 1.4)).all()
  got = np.asarray(jax.jit(device_augment.flip_and_jitter)(images, flip, factors))
  assert got.dtype == np.uint8 and got.shape == images.shape
  diff = np.abs(got.astype(int) - _reference(images, flip, factors))
  # float32 against float64: only values within rounding of a .5 may differ, by 1.
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01
  assert (got == 255).any() and (got == 0).any()  # clipping was exercised


def test_jitter_is_the_host_jitter_given_its_draws():
  image = _images(count=1, side=16, seed=1)[0]
  factors = np.random.default_rng(7).uniform(0.75, 1.25, 3).astype(np.float32)
  host = augment.color_jitter(image, np.random.default_rng(7))
  device = np.asarray(device_augment.flip_and_jitter(image[None], np.zeros(1, bool),
                                                     factors[None]))[0]
  assert np.abs(host.astype(int) - device).max() <= 1


def test_augment_queries_touches_only_queries_and_depends_on_the_key():
  batch = {"query_image": _images(count=8), "item_image": _images(count=8, seed=2)}
  a = device_augment.augment_queries(batch, jax.random.PRNGKey(0))
  b = device_augment.augment_queries(batch, jax.random.PRNGKey(0))
  c = device_augment.augment_queries(batch, jax.random.PRNGKey(1))
  assert a["item_image"] is batch["item_image"]
  np.testing.assert_array_equal(a["query_image"], b["query_image"])
  assert not np.array_equal(a["query_image"], c["query_image"])
  flip, factors = device_augment.draw(jax.random.PRNGKey(0), 8)
  expected = _reference(batch["query_image"], np.asarray(flip), np.asarray(factors))
  assert np.abs(np.asarray(a["query_image"]).astype(int) - expected).max() <= 1


def test_host_only_crops_when_the_device_jitters():
  image = Image.fromarray(_images(count=1, side=40, seed=4)[0])
  crop_only = augment.augment_query(image, np.random.default_rng(2), 16, flip_and_jitter=False)
  crop = np.asarray(augment.random_resized_crop(image, np.random.default_rng(2), 16), np.uint8)
  np.testing.assert_array_equal(crop_only, crop)
  full = augment.augment_query(image, np.random.default_rng(2), 16)
  assert not np.array_equal(full, crop)
