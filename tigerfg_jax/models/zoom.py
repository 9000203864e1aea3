"""Attention zoom: an item re-encoded from the region its own text-guided attention picks.

The item tower's first look reads the whole image; its title-guided attention map (the
mean over heads, `[B, G, G]`) marks the titled product. `attention_box` takes the
bounding box of the cells connected to the map's peak that hold at least `threshold` of
it; `context_square` grows it as the privileged teacher's crop is grown
(`data.augment.context_box`: the longer side plus `CONTEXT_MARGIN` on each side, the
square shifted inside the image); `crop_resize` cuts that square from the item image and
resizes it to the item size. The second look embeds the crop, so the ViT's tokens no
longer mix the product with its neighbours, and the item's embedding is the
normalised sum of both looks (`towers.ItemTower` with `model.zoom_threshold`).

A crop's attention map is sharper than the whole image's (the product covers more of
its cells), so a refinement (`model.zoom_refinements`) takes the box again inside the
crop, places it in the image (`within`) and cuts the image's pixels there; the last
look replaces the second in the sum. On the synthetic benchmark one refinement raised
the share of eval_cluttered crops within IoU 0.5 of the true context square from 58% to
63% (3 seeds, docs/results.md).

Everything here is a pure function of arrays, under `stop_gradient`: the box is a
choice, not a path for gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Context around the box per side, as a fraction of its longer side: the privileged
# teacher's crop margin (`data.augment.TARGET_MARGIN`; models do not import data, and
# tests/test_zoom.py checks the two agree).
CONTEXT_MARGIN = 0.1
WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)   # a normalised region (x0, y0, x1, y1): the image.


def within(outer: jax.Array, inner: jax.Array) -> jax.Array:
  """float32 `[B, 4]` normalised regions of the image and `[B, 4]` normalised boxes of
  those regions (a crop's own coordinates) -> the boxes in the image's coordinates."""
  size = outer[:, 2:] - outer[:, :2]
  return jnp.concatenate([outer[:, :2] + inner[:, :2] * size,
                          outer[:, :2] + inner[:, 2:] * size], axis=-1)


def attention_box(attention: jax.Array, threshold: float) -> jax.Array:
  """float `[B, G, G]` maps -> float32 `[B, 4]` normalised (x0, y0, x1, y1): the
  bounding box of the peak cell's region, the cells with `attention >= threshold *
  peak` that connect to the peak through such cells (8-neighbourhood; 0 < threshold
  <= 1). A second product the title does not name rarely joins it, as a box over all
  such cells would let it."""
  attention = jax.lax.stop_gradient(attention.astype(jnp.float32))
  batch, grid = attention.shape[0], attention.shape[-1]
  keep = attention >= threshold * attention.max(axis=(1, 2), keepdims=True)
  flat_peak = jnp.argmax(attention.reshape(batch, -1), axis=1)
  region = jax.nn.one_hot(flat_peak, grid * grid, dtype=bool).reshape(batch, grid, grid)

  def grow(_, region):
    padded = jnp.pad(region, ((0, 0), (1, 1), (1, 1)))
    near = jnp.zeros_like(region)
    for dy in range(3):
      for dx in range(3):
        near = near | padded[:, dy:dy + grid, dx:dx + grid]
    return near & keep

  # A connected region of n cells is reached from any of its cells in < n steps.
  region = jax.lax.fori_loop(0, grid * grid - 1, grow, region)
  cells = jnp.arange(grid)

  def span(occupied: jax.Array) -> tuple[jax.Array, jax.Array]:
    lo = jnp.min(jnp.where(occupied, cells, grid), axis=1)
    hi = jnp.max(jnp.where(occupied, cells, -1), axis=1) + 1
    return lo, hi

  y0, y1 = span(region.any(axis=2))
  x0, x1 = span(region.any(axis=1))
  return jnp.stack([x0, y0, x1, y1], axis=-1).astype(jnp.float32) / grid


def context_square(boxes: jax.Array, margin: float) -> jax.Array:
  """float32 `[B, 4]` normalised boxes of a square image -> the square region around
  each: side `max(w, h) * (1 + 2 margin)` (at most the image) about the box's centre,
  shifted to lie inside the image. `data.augment.context_box` for a square image."""
  x0, y0, x1, y1 = (boxes[:, i] for i in range(4))
  side = jnp.minimum(jnp.maximum(x1 - x0, y1 - y0) * (1 + 2 * margin), 1.0)

  def start(lo: jax.Array, hi: jax.Array) -> jax.Array:
    return jnp.clip((lo + hi) / 2 - side / 2, 0.0, 1.0 - side)

  left, top = start(x0, x1), start(y0, y1)
  return jnp.stack([left, top, left + side, top + side], axis=-1)


def crop_resize(images: jax.Array, boxes: jax.Array) -> jax.Array:
  """uint8 or float `[B, S, S, C]` and normalised boxes float32 `[B, 4]` inside the
  image -> float32 `[B, S, S, C]` on the input's 0..255 scale: each box's region
  resampled to the full size, bilinear at the output's pixel centres (edge pixels
  repeat beyond the border). Four gathers per output pixel, no matmul: a box inside
  the image is never smaller than its output, so no antialiasing is needed."""
  size = images.shape[1]
  centres = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.float32))

  def taps(lo: jax.Array, hi: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """[B] box edges -> the two source pixels `[B, S]` int32 and the far one's weight."""
    coords = (lo[:, None] + centres[None, :] * (hi - lo)[:, None]) * size - 0.5
    floor = jnp.floor(coords)
    first = jnp.clip(floor, 0, size - 1).astype(jnp.int32)
    second = jnp.clip(floor + 1, 0, size - 1).astype(jnp.int32)
    return first, second, coords - floor

  y_lo, y_hi, fy = taps(boxes[:, 1], boxes[:, 3])
  x_lo, x_hi, fx = taps(boxes[:, 0], boxes[:, 2])
  pixels = images.astype(jnp.float32)

  def sample(ys: jax.Array, xs: jax.Array) -> jax.Array:
    rows = jnp.take_along_axis(pixels, ys[:, :, None, None], axis=1)
    return jnp.take_along_axis(rows, xs[:, None, :, None], axis=2)

  fy, fx = fy[:, :, None, None], fx[:, None, :, None]
  top = sample(y_lo, x_lo) * (1 - fx) + sample(y_lo, x_hi) * fx
  bottom = sample(y_hi, x_lo) * (1 - fx) + sample(y_hi, x_hi) * fx
  return top * (1 - fy) + bottom * fy
