"""Attention zoom (models/zoom.py, `TigerFG.embed_item` with `model.zoom_threshold`)
against NumPy float64 references and closed forms."""

from __future__ import annotations

import collections

import jax
import numpy as np
import pytest

from tigerfg_jax import config_lib
from tigerfg_jax.data import augment
from tigerfg_jax.models import towers, zoom

VOCAB = 40


def _reference_box(attention: np.ndarray, threshold: float) -> np.ndarray:
  """Breadth-first search from the peak over cells >= threshold * peak (8 neighbours)."""
  grid = attention.shape[0]
  keep = attention >= threshold * attention.max()
  start = np.unravel_index(np.argmax(attention), attention.shape)
  seen, todo = {start}, collections.deque([start])
  while todo:
    y, x = todo.popleft()
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        cell = (y + dy, x + dx)
        if (0 <= cell[0] < grid and 0 <= cell[1] < grid and cell not in seen
            and keep[cell]):
          seen.add(cell)
          todo.append(cell)
  ys, xs = zip(*seen)
  return np.array([min(xs), min(ys), max(xs) + 1, max(ys) + 1], np.float64) / grid


def test_attention_box_is_the_peaks_connected_region_not_every_bright_cell():
  grid = 8
  attention = np.full((grid, grid), 0.01)
  attention[1:3, 1:4] = 0.5          # the titled product: peak inside
  attention[2, 2] = 1.0
  attention[6:8, 5:8] = 0.9          # a bright distractor, not touching it
  box = np.asarray(zoom.attention_box(attention[None], 0.3))[0]
  np.testing.assert_allclose(box, np.array([1, 1, 4, 3]) / grid)
  # A bridge of bright cells joins the two regions: the box spans both.
  attention[3:6, 4] = 0.4
  box = np.asarray(zoom.attention_box(attention[None], 0.3))[0]
  np.testing.assert_allclose(box, np.array([1, 1, 8, 8]) / grid)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7, 1.0])
def test_attention_box_matches_a_breadth_first_search(threshold):
  rng = np.random.default_rng(1)
  maps = rng.gamma(0.5, size=(16, 6, 6))
  got = np.asarray(zoom.attention_box(maps.astype(np.float32), threshold))
  want = np.stack([_reference_box(m, threshold) for m in maps])
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_the_zoom_crops_with_the_teachers_margin():
  assert zoom.CONTEXT_MARGIN == augment.TARGET_MARGIN


def test_context_square_is_the_teachers_crop_rule_on_a_square_image():
  rng = np.random.default_rng(2)
  corners = rng.uniform(0, 1, (64, 2, 2))
  boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)
  boxes = boxes[:, [0, 1, 2, 3]]   # x0, y0 then x1, y1
  got = np.asarray(zoom.context_square(boxes.astype(np.float32), augment.TARGET_MARGIN))
  want = np.stack([augment.context_box(b, 1.0, 1.0) for b in boxes])
  np.testing.assert_allclose(got, want, atol=1e-6)


def _reference_crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
  """float64 bilinear sampling of `box` at the output's pixel centres (edge clamped)."""
  size = image.shape[0]
  x0, y0, x1, y1 = box
  centres = (np.arange(size) + 0.5) / size
  ys = (y0 + centres * (y1 - y0)) * size - 0.5
  xs = (x0 + centres * (x1 - x0)) * size - 0.5

  def weights(coords):
    lo = np.floor(coords).astype(int)
    frac = coords - lo
    return np.clip(lo, 0, size - 1), np.clip(lo + 1, 0, size - 1), frac

  y_lo, y_hi, fy = weights(ys)
  x_lo, x_hi, fx = weights(xs)
  image = image.astype(np.float64)
  top = image[y_lo][:, x_lo] * (1 - fx)[None, :, None] + image[y_lo][:, x_hi] * fx[None, :, None]
  bottom = (image[y_hi][:, x_lo] * (1 - fx)[None, :, None]
            + image[y_hi][:, x_hi] * fx[None, :, None])
  return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def test_crop_resize_samples_the_box_bilinearly():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (3, 16, 16, 3), np.uint8)
  # Boxes well inside the image (no edge clamping): the crop upsamples.
  boxes = np.array([[0.25, 0.25, 0.75, 0.75], [0.1, 0.3, 0.5, 0.7], [0.4, 0.2, 0.9, 0.7]],
                   np.float32)
  got = np.asarray(zoom.crop_resize(images, boxes))
  assert got.dtype == np.float32 and got.shape == images.shape
  for image, box, crop in zip(images, boxes, got):
    np.testing.assert_allclose(crop, _reference_crop(image, box.astype(np.float64)),
                               atol=1e-3)


def test_crop_resize_of_the_whole_image_is_the_image():
  images = np.random.default_rng(4).integers(0, 256, (2, 8, 8, 3), np.uint8)
  whole = np.tile(np.array([[0, 0, 1, 1]], np.float32), (2, 1))
  np.testing.assert_allclose(np.asarray(zoom.crop_resize(images, whole)), images, atol=1e-3)


def _model(threshold: float, mode: str = "tiger", refinements: int = 0) -> towers.TigerFG:
  config = config_lib.experiment_config("distill", "micro").model
  config.update(vocab_size=VOCAB, zoom_threshold=threshold, mode=mode,
                zoom_refinements=refinements)
  return towers.TigerFG(config)


def _items(seed: int = 0):
  rng = np.random.default_rng(seed)
  mask = np.arange(16)[None, :] < np.array([5, 9, 16])[:, None]
  return (rng.integers(0, 256, (3, 32, 32, 3), np.uint8),
          np.where(mask, rng.integers(1, VOCAB, mask.shape), 0).astype(np.int32), mask)


@pytest.mark.parametrize("mode", ["tiger", "clip_style"])
def test_embed_item_zoom_over_the_whole_image_changes_nothing(mode):
  """A threshold that keeps every cell zooms to the whole image: both passes read the
  same pixels, and the normalised sum of two equal unit vectors is that vector."""
  images, tokens, mask = _items()
  plain = _model(0.0, mode)
  params = plain.init(jax.random.key(0), images, tokens, mask,
                      method=towers.TigerFG.embed_item)
  want, _ = plain.apply(params, images, tokens, mask, method=towers.TigerFG.embed_item)
  got, aux = _model(1e-9, mode).apply(params, images, tokens, mask,
                                      method=towers.TigerFG.embed_item)
  np.testing.assert_allclose(np.asarray(aux["zoom_box"]), np.tile([[0, 0, 1, 1]], (3, 1)),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_embed_item_zoom_crops_to_the_attention_peak():
  """threshold=1 keeps the peak cell only: the crop is its context square, and the
  embedding is the normalised sum of the whole image's and that crop's."""
  images, tokens, mask = _items(1)
  plain = _model(0.0)
  params = plain.init(jax.random.key(1), images, tokens, mask,
                      method=towers.TigerFG.embed_item)
  whole, aux = plain.apply(params, images, tokens, mask, method=towers.TigerFG.embed_item)
  grid = 32 // 8
  peak = np.asarray(aux["attention"]).mean(axis=1).argmax(axis=1)
  y, x = np.divmod(peak, grid)
  cell = np.stack([x, y, x + 1, y + 1], axis=1) / grid
  want_box = np.stack([augment.context_box(b, 1.0, 1.0) for b in cell])
  got, zoomed_aux = _model(1.0).apply(params, images, tokens, mask,
                                      method=towers.TigerFG.embed_item)
  np.testing.assert_allclose(np.asarray(zoomed_aux["zoom_box"]), want_box, atol=1e-6)
  crops = np.asarray(zoom.crop_resize(images, want_box.astype(np.float32)))
  crop_emb, _ = plain.apply(params, crops, tokens, mask, method=towers.TigerFG.embed_item)
  total = np.asarray(whole, np.float64) + np.asarray(crop_emb, np.float64)
  np.testing.assert_allclose(np.asarray(got), total / np.linalg.norm(total, axis=1,
                                                                      keepdims=True),
                             atol=2e-5)
  assert np.abs(np.asarray(got) - np.asarray(whole)).max() > 1e-3


@pytest.mark.parametrize("overrides, message", [
    (dict(zoom_threshold=1.5), "zoom_threshold=1.5"),
    (dict(zoom_threshold=-0.1), "zoom_threshold=-0.1"),
    (dict(zoom_refinements=-1), "zoom_refinements=-1"),
    (dict(zoom_threshold=0.2, item_fusion="smar"), "item_fusion='smar'"),
])
def test_a_zoom_the_model_cannot_do_is_refused(overrides, message):
  config = config_lib.experiment_config("distill", "micro").model
  config.update(vocab_size=VOCAB, **overrides)
  images, tokens, mask = _items()
  with pytest.raises(ValueError, match=message):
    towers.TigerFG(config).init(jax.random.key(0), images, tokens, mask,
                                method=towers.TigerFG.embed_item)


def test_training_call_zooms_the_item_and_its_title_swaps_alike():
  """`TigerFG.__call__` (the train step's) looks twice as `embed_item` does: over the
  whole image (threshold ~0) every output is the one-pass model's; at the peak cell
  (threshold 1) `item_emb` is `embed_item`'s and each title swap is the normalised sum
  of the whole image and the same crop pooled under the swapped title."""
  images, tokens, mask = _items(2)
  batch = dict(item_image=images, title_tokens=tokens, title_mask=mask)
  plain = _model(0.0)
  params = plain.init(jax.random.key(2), batch, swap_titles=1)
  want = plain.apply(params, batch, swap_titles=1)
  near_zero = _model(1e-9).apply(params, batch, swap_titles=1)
  for key in ("item_emb", "swap_emb", "attention"):
    np.testing.assert_allclose(np.asarray(near_zero[key]), np.asarray(want[key]), atol=2e-5)
  peak = _model(1.0)
  got = peak.apply(params, batch, swap_titles=1)
  deployed, aux = peak.apply(params, images, tokens, mask, method=towers.TigerFG.embed_item)
  np.testing.assert_allclose(np.asarray(got["item_emb"]), np.asarray(deployed), atol=2e-5)
  crops = np.asarray(zoom.crop_resize(images, np.asarray(aux["zoom_box"])))
  crop_out = plain.apply(params, dict(batch, item_image=crops), swap_titles=1)
  total = (np.asarray(want["swap_emb"], np.float64)
           + np.asarray(crop_out["swap_emb"], np.float64))
  np.testing.assert_allclose(np.asarray(got["swap_emb"]),
                             total / np.linalg.norm(total, axis=-1, keepdims=True), atol=2e-5)


def test_within_maps_a_crops_box_into_the_image():
  """A box of a crop, in the crop's own coordinates, lands at the crop's offset plus the
  box scaled by the crop's size (closed form); the whole image maps boxes to themselves."""
  outer = np.array([[0.2, 0.4, 0.6, 0.8], [0, 0, 1, 1]], np.float32)
  inner = np.array([[0.5, 0.0, 1.0, 0.25], [0.1, 0.2, 0.3, 0.4]], np.float32)
  want = np.array([[0.2 + 0.5 * 0.4, 0.4, 0.6, 0.4 + 0.25 * 0.4], [0.1, 0.2, 0.3, 0.4]])
  np.testing.assert_allclose(np.asarray(zoom.within(outer, inner)), want, atol=1e-6)


def test_a_refinement_zooms_into_the_first_crops_attention_peak():
  """`zoom_refinements=1`, threshold 1: the first crop is the context square of the whole
  image's peak cell; the second is the context square of the first crop's own peak cell,
  placed in the image; the embedding sums the whole image's and the last crop's."""
  images, tokens, mask = _items(3)
  plain = _model(0.0)
  params = plain.init(jax.random.key(3), images, tokens, mask,
                      method=towers.TigerFG.embed_item)
  grid = 32 // 8

  def peak_context(region: np.ndarray, attention) -> np.ndarray:
    y, x = np.divmod(np.asarray(attention).mean(axis=1).argmax(axis=1), grid)
    size = region[:, 2:] - region[:, :2]
    cell = np.concatenate([region[:, :2] + np.stack([x, y], 1) / grid * size,
                           region[:, :2] + np.stack([x + 1, y + 1], 1) / grid * size], 1)
    return np.stack([augment.context_box(b, 1.0, 1.0) for b in cell]).astype(np.float32)

  whole, aux = plain.apply(params, images, tokens, mask, method=towers.TigerFG.embed_item)
  first = peak_context(np.tile([[0.0, 0.0, 1.0, 1.0]], (3, 1)), aux["attention"])
  _, first_aux = plain.apply(params, zoom.crop_resize(images, first), tokens, mask,
                             method=towers.TigerFG.embed_item)
  second = peak_context(first.astype(np.float64), first_aux["attention"])
  got, got_aux = _model(1.0, refinements=1).apply(params, images, tokens, mask,
                                                  method=towers.TigerFG.embed_item)
  np.testing.assert_allclose(np.asarray(got_aux["zoom_box"]), second, atol=1e-5)
  assert np.abs(second - first).max() > 1e-2
  crop_emb, _ = plain.apply(params, zoom.crop_resize(images, second), tokens, mask,
                            method=towers.TigerFG.embed_item)
  total = np.asarray(whole, np.float64) + np.asarray(crop_emb, np.float64)
  np.testing.assert_allclose(np.asarray(got), total / np.linalg.norm(total, axis=1,
                                                                      keepdims=True),
                             atol=2e-5)


def test_a_refinement_reads_the_own_title_in_training_too():
  """In the training call the refinement's look pools under the own title only (the
  title-swap partners' slots are sliced off): its crop and `item_emb` are
  `embed_item`'s."""
  images, tokens, mask = _items(4)
  batch = dict(item_image=images, title_tokens=tokens, title_mask=mask)
  refined = _model(1.0, refinements=1)
  params = _model(0.0).init(jax.random.key(4), batch, swap_titles=2)
  got = refined.apply(params, batch, swap_titles=2)
  deployed, aux = refined.apply(params, images, tokens, mask,
                                method=towers.TigerFG.embed_item)
  np.testing.assert_allclose(np.asarray(got["zoom_box"]), np.asarray(aux["zoom_box"]),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(got["item_emb"]), np.asarray(deployed), atol=2e-5)
