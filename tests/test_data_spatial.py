"""Tests of box -> patch targets and augmentation (spatial.py, augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tigerfg_jax.data import augment, spatial


def _reference_coverage(box, grid, fine=64):
  """float64 [grid * grid]: covered fraction per patch by counting the centres of a
  fine sub-grid of sample points inside the box (exact for boxes on the fine grid)."""
  side = grid * fine
  centres = (np.arange(side) + 0.5) / side
  inside_x = (centres >= box[0]) & (centres < box[2])
  inside_y = (centres >= box[1]) & (centres < box[3])
  covered = np.outer(inside_y, inside_x).astype(np.float64)
  return covered.reshape(grid, fine, grid, fine).mean(axis=(1, 3)).reshape(-1)


def test_hand_computed_maps():
  grid = 4
  target = spatial.patch_target([0.25, 0.25, 0.75, 0.5], grid).reshape(grid, grid)
  expected = np.zeros((grid, grid))
  expected[1, 1] = expected[1, 2] = 0.5
  np.testing.assert_allclose(target, expected, atol=1e-7)
  # x from 0.1 to 0.3 covers 0.6 of column 0 and 0.2 of column 1, all of row 0.
  target = spatial.patch_target([0.1, 0.0, 0.3, 0.25], grid).reshape(grid, grid)
  expected = np.zeros((grid, grid))
  expected[0, 0], expected[0, 1] = 0.75, 0.25
  np.testing.assert_allclose(target, expected, atol=1e-6)


def test_maps_match_a_sampled_reference_and_sum_to_one():
  rng = np.random.default_rng(0)
  grid, fine = 7, 64
  for _ in range(20):
    # Box edges on the fine grid so that sample counting is exact.
    lo = rng.integers(0, grid * fine - 1, size=2)
    hi = [rng.integers(l + 1, grid * fine + 1) for l in lo]
    box = np.asarray([lo[0], lo[1], hi[0], hi[1]], np.float64) / (grid * fine)
    reference = _reference_coverage(box, grid, fine)
    target = spatial.patch_targets(box[None], np.asarray([True]), grid)[0]
    np.testing.assert_allclose(target, reference / reference.sum(), atol=1e-6)
    assert target.dtype == np.float32 and abs(target.sum() - 1) < 1e-5


def test_uniform_without_box_or_area():
  targets = spatial.patch_targets(np.asarray([[0.2, 0.2, 0.6, 0.6], [0.3, 0.3, 0.3, 0.8]]),
                                  np.asarray([False, True]), 3)
  np.testing.assert_allclose(targets, np.full((2, 9), 1 / 9), atol=1e-7)
  np.testing.assert_allclose(spatial.patch_target(None, 2), [0.25] * 4)


def test_normalize_box_and_grid_size():
  np.testing.assert_allclose(spatial.normalize_box([10, 5, 30, 20], 40, 20),
                             [0.25, 0.25, 0.75, 1.0])
  assert spatial.grid_size(64, 8) == 8
  with pytest.raises(ValueError, match="multiple of the patch size"):
    spatial.grid_size(60, 8)


def test_query_augmentation_is_deterministic_and_sized():
  pixels = np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
  image = Image.fromarray(pixels)
  a = augment.augment_query(image, np.random.default_rng(5), 24)
  b = augment.augment_query(image, np.random.default_rng(5), 24)
  c = augment.augment_query(image, np.random.default_rng(6), 24)
  assert a.shape == (24, 24, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_color_jitter_identity_at_zero_strength():
  pixels = np.random.default_rng(1).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
  out = augment.color_jitter(pixels, np.random.default_rng(0), strength=0.0)
  np.testing.assert_allclose(out.astype(int), pixels.astype(int), atol=1)
