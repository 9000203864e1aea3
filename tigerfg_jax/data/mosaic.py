"""Mosaic (as in the paper): products cut from their boxes, pasted together on one canvas.

A canvas is an item image (S x S) showing 2 .. `max_products` products, each the target
of one training example and a distractor for the others. A product is its example's box
region of the item image (the whole image when the example has no box, e.g. a clean
product photo), resized so that its longer side is a random 30-55% of S and its aspect
(in the item file's pixels) is kept, at a random position: a position overlapping an
earlier product is rejected, up to `PLACEMENT_TRIES` tries, after which the least
overlapping position tried is taken (so a crowded canvas overlaps rather than loops).
Later products cover earlier ones. Each example's box is where its product was pasted.

Background: a smooth gradient between four random corner colours plus mild Gaussian
noise. It never holds a product (a crop of another item image outside its box may hold
an unlabelled one, perhaps the target's own), needs no extra image read, and the noise
keeps it from being a flat colour the model could learn to skip.

Randomness comes from an explicit `np.random.Generator`; canvases are uint8 [S, S, 3].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np
from PIL import Image

from tigerfg_jax.data import augment

# A product's longer side, in percent of the canvas side (inclusive bounds).
SCALE_PERCENT = (30, 55)
# Positions tried per product before an overlap is accepted.
PLACEMENT_TRIES = 20
# Standard deviation of the background noise, in pixel levels.
NOISE_STD = 4.0


@dataclasses.dataclass(frozen=True)
class Product:
  """A product to paste: `box` (normalised, None: whole image) of `image`, whose true
  width / height (in the item file's pixels: stored images may be squashed) is `aspect`."""
  image: Image.Image
  box: np.ndarray | None
  aspect: float


def product_aspect(box: Sequence[float] | None, width: float, height: float) -> float:
  """Width / height of the normalised `box` (None: the whole image) of a file of
  `width` x `height` pixels."""
  x0, y0, x1, y1 = (0.0, 0.0, 1.0, 1.0) if box is None else (float(v) for v in box)
  return max((x1 - x0) * width, 1e-6) / max((y1 - y0) * height, 1e-6)


def partition(count: int, max_products: int, rng: np.random.Generator) -> list[range]:
  """Consecutive example indices of `count` examples cut into canvases.

  Canvas after canvas takes k examples, k uniform in 2 .. min(max_products, examples
  left) (so 1 .. max_products - 1 distractors), until fewer than 2 are left; a last
  single example is on no canvas. For 4 examples: one canvas of 4, of 3 (and one
  example left alone), or two of 2, each with probability 1/3.
  """
  canvases, start = [], 0
  while count - start >= 2:
    k = int(rng.integers(2, min(max_products, count - start) + 1))
    canvases.append(range(start, start + k))
    start += k
  return canvases


@functools.lru_cache(maxsize=None)
def expected_on_canvases(count: int, max_products: int) -> float:
  """Expected number of the `count` examples that `partition` puts on a canvas."""
  if count < 2:
    return 0.0
  sizes = range(2, min(max_products, count) + 1)
  return sum(k + expected_on_canvases(count - k, max_products) for k in sizes) / len(sizes)


def pasted_size(aspect: float, size: int, rng: np.random.Generator) -> tuple[int, int]:
  """(width, height) in pixels of a product of `aspect` on a `size` canvas: the longer
  side uniform in SCALE_PERCENT of `size`, the shorter from the aspect (at least 1)."""
  low, high = -(-SCALE_PERCENT[0] * size // 100), SCALE_PERCENT[1] * size // 100
  longer = int(rng.integers(low, high + 1))
  shorter = max(1, round(longer * min(aspect, 1.0 / aspect)))
  return (longer, shorter) if aspect >= 1.0 else (shorter, longer)


def _overlap(rect: np.ndarray, placed: np.ndarray) -> int:
  """Pixels of `rect` [4] covered by the rectangles `placed` [n, 4] (counted per rectangle)."""
  if not len(placed):
    return 0
  w = np.minimum(rect[2], placed[:, 2]) - np.maximum(rect[0], placed[:, 0])
  h = np.minimum(rect[3], placed[:, 3]) - np.maximum(rect[1], placed[:, 1])
  return int((np.clip(w, 0, None) * np.clip(h, 0, None)).sum())


def place(sizes: Sequence[tuple[int, int]], size: int,
          rng: np.random.Generator) -> np.ndarray:
  """int64 [n, 4] pixel rectangles x0, y0, x1, y1 inside the `size` canvas, one per
  (width, height), placed in order: the first of PLACEMENT_TRIES random positions that
  overlaps no earlier rectangle, else the least overlapping of them."""
  placed = np.zeros((0, 4), np.int64)
  for width, height in sizes:
    best, best_overlap = None, None
    for _ in range(PLACEMENT_TRIES):
      x, y = int(rng.integers(size - width + 1)), int(rng.integers(size - height + 1))
      rect = np.asarray([x, y, x + width, y + height], np.int64)
      overlap = _overlap(rect, placed)
      if best is None or overlap < best_overlap:
        best, best_overlap = rect, overlap
      if not overlap:
        break
    placed = np.concatenate([placed, best[None]])
  return placed


def background(size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [size, size, 3]: bilinear gradient between 4 random corner colours, plus noise."""
  corners = rng.uniform(0.0, 255.0, (2, 2, 3))
  t = np.linspace(0.0, 1.0, size)[:, None]
  top = corners[0, 0] * (1 - t) + corners[0, 1] * t          # [size (x), 3]
  bottom = corners[1, 0] * (1 - t) + corners[1, 1] * t
  gradient = top[None] * (1 - t[:, :, None]) + bottom[None] * t[:, :, None]
  noisy = gradient + rng.normal(0.0, NOISE_STD, gradient.shape)
  return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def compose(products: Sequence[Product], size: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The canvas uint8 [size, size, 3] and each product's box float32 [n, 4] (normalised)."""
  canvas = background(size, rng)
  rects = place([pasted_size(p.aspect, size, rng) for p in products], size, rng)
  for product, (x0, y0, x1, y1) in zip(products, rects):
    canvas[y0:y1, x0:x1] = augment.crop_resize(product.image, product.box, x1 - x0, y1 - y0)
  return canvas, (rects / size).astype(np.float32)
