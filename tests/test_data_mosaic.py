"""Tests of the Mosaic canvas (tigerfg_jax/data/mosaic.py) and the box crop it pastes."""

from __future__ import annotations

import collections

import numpy as np
import pytest
from PIL import Image

from tigerfg_jax.data import augment, mosaic


def _random_image(seed, width, height):
  pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
  return Image.fromarray(pixels)


def test_crop_resize_is_the_box_region_resized():
  image = _random_image(0, 60, 40)
  box = np.asarray([0.25, 0.1, 0.75, 0.9])
  expected = image.resize((24, 16), Image.Resampling.BILINEAR, box=(15, 4, 45, 36))
  np.testing.assert_array_equal(augment.crop_resize(image, box, 24, 16), np.asarray(expected))
  whole = image.resize((20, 20), Image.Resampling.BILINEAR)
  np.testing.assert_array_equal(augment.crop_resize(image, None, 20, 20), np.asarray(whole))


def test_partition_sizes_and_distractor_counts():
  rng = np.random.default_rng(0)
  first = collections.Counter()
  for _ in range(3000):
    canvases = mosaic.partition(4, 4, rng)
    starts = [c.start for c in canvases]
    # Consecutive canvases of 2..4 from example 0, at most one example left over.
    assert starts[0] == 0 and all(a.stop == b.start for a, b in zip(canvases, canvases[1:]))
    assert all(2 <= len(c) <= 4 for c in canvases) and 4 - canvases[-1].stop <= 1
    first[len(canvases[0])] += 1
  # 1, 2 or 3 distractors on the first canvas, each about a third of the time.
  assert set(first) == {2, 3, 4}
  assert all(abs(first[k] / 3000 - 1 / 3) < 0.04 for k in first)
  assert mosaic.partition(1, 4, rng) == [] and mosaic.partition(0, 4, rng) == []
  assert all(len(c) <= 3 for _ in range(200) for c in mosaic.partition(9, 3, rng))


def test_expected_on_canvases():
  # 4 examples, up to 4 per canvas: a canvas of 2 (then another of 2), of 3 (one left
  # alone) or of 4, each 1/3: (4 + 3 + 4) / 3.
  assert mosaic.expected_on_canvases(4, 4) == pytest.approx(11 / 3)
  assert mosaic.expected_on_canvases(1, 4) == 0 and mosaic.expected_on_canvases(2, 4) == 2
  rng = np.random.default_rng(1)
  draws = [sum(len(c) for c in mosaic.partition(7, 4, rng)) for _ in range(4000)]
  assert np.mean(draws) == pytest.approx(mosaic.expected_on_canvases(7, 4), abs=0.05)


def test_pasted_size_keeps_the_aspect_within_the_scale_range():
  rng = np.random.default_rng(2)
  longer = set()
  for aspect in (2.0, 0.5, 1.0, 3.7, 0.01):
    for _ in range(200):
      width, height = mosaic.pasted_size(aspect, 32, rng)
      long_side, short_side = max(width, height), min(width, height)
      assert 0.30 * 32 <= long_side <= 0.55 * 32
      assert (width >= height) == (aspect >= 1.0)
      ratio = min(aspect, 1 / aspect)
      assert abs(short_side - long_side * ratio) <= 0.5 or short_side == 1
      longer.add(long_side)
  assert longer == set(range(10, 18))  # ceil(9.6) .. floor(17.6)


def test_place_inside_without_overlap_when_there_is_room():
  rng = np.random.default_rng(3)
  for _ in range(50):
    rects = mosaic.place([(10, 8), (8, 10), (12, 6), (7, 7)], 64, rng)
    assert (rects[:, :2] >= 0).all() and (rects[:, 2:] <= 64).all()
    np.testing.assert_array_equal(rects[:, 2:] - rects[:, :2], [[10, 8], [8, 10], [12, 6], [7, 7]])
    for a in range(4):
      for b in range(a):
        assert (min(rects[a, 2], rects[b, 2]) <= max(rects[a, 0], rects[b, 0])
                or min(rects[a, 3], rects[b, 3]) <= max(rects[a, 1], rects[b, 1]))
  # No room: four 40 px squares on 64 px must overlap; placement still ends, inside.
  crowded = mosaic.place([(40, 40)] * 4, 64, rng)
  assert (crowded[:, :2] >= 0).all() and (crowded[:, 2:] <= 64).all()


def _bilinear_fit_residual(channel):
  """Residual of the least-squares fit a + b x + c y + d x y (float64)."""
  y, x = np.mgrid[:channel.shape[0], :channel.shape[1]].astype(np.float64)
  design = np.stack([np.ones_like(x), x, y, x * y], -1).reshape(-1, 4)
  values = channel.reshape(-1).astype(np.float64)
  coef, *_ = np.linalg.lstsq(design, values, rcond=None)
  return values - design @ coef


def test_background_is_a_gradient_plus_mild_noise(monkeypatch):
  a = mosaic.background(48, np.random.default_rng(4))
  b = mosaic.background(48, np.random.default_rng(5))
  assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)
  for c in range(3):
    residual = _bilinear_fit_residual(a[..., c])
    assert 0.8 * mosaic.NOISE_STD < residual.std() < 1.2 * mosaic.NOISE_STD
  monkeypatch.setattr(mosaic, "NOISE_STD", 0.0)
  smooth = mosaic.background(48, np.random.default_rng(4)).astype(np.int64)
  for c in range(3):
    # Rounded to integers: the least-squares fit is within a level of every pixel.
    assert np.abs(_bilinear_fit_residual(smooth[..., c])).max() < 1.0


def test_compose_pastes_each_product_at_its_box():
  images = [_random_image(10 + i, 40 + 10 * i, 30) for i in range(3)]
  boxes = [np.asarray([0.1, 0.2, 0.6, 0.9]), None, np.asarray([0.5, 0.0, 1.0, 0.5])]
  products = [mosaic.Product(im, box, mosaic.product_aspect(box, *im.size))
              for im, box in zip(images, boxes)]
  for seed in range(10):
    canvas, pasted = mosaic.compose(products, 64, np.random.default_rng(seed))
    assert canvas.shape == (64, 64, 3) and pasted.dtype == np.float32
    rects = np.rint(pasted * 64).astype(int)
    np.testing.assert_allclose(pasted * 64, rects, atol=1e-4)
    covered_later = np.zeros((64, 64), bool)
    for i in reversed(range(3)):
      x0, y0, x1, y1 = rects[i]
      assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
      assert 0.30 * 64 <= max(x1 - x0, y1 - y0) <= 0.55 * 64
      width, height = images[i].size
      region = (0, 0, width, height) if boxes[i] is None else tuple(
          boxes[i] * [width, height, width, height])
      expected = np.asarray(images[i].resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR,
                                             box=region))
      visible = ~covered_later[y0:y1, x0:x1]
      np.testing.assert_array_equal(canvas[y0:y1, x0:x1][visible], expected[visible])
      covered_later[y0:y1, x0:x1] = True


def test_product_aspect_uses_file_pixels():
  assert mosaic.product_aspect([0.0, 0.0, 0.5, 0.5], 200, 100) == pytest.approx(2.0)
  assert mosaic.product_aspect(None, 30, 60) == pytest.approx(0.5)
