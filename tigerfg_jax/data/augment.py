"""Image resizing and augmentation: the evaluation resize, query jitter and item Mosaic.
Randomness comes from an explicit `np.random.Generator`; images go in as PIL RGB (or
encoded bytes) and come out as uint8 [S, S, 3].

Mosaic (as in the paper) tiles `grid x grid` item images into one image of the item
size; each tile's target box moves with its tile, so one mosaic serves as the item of
grid^2 training examples, one per tile, that compete as negatives in the same batch.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from tigerfg_jax.data import folder

_RESAMPLE = Image.Resampling.BILINEAR


def resize(image: Image.Image, width: int, height: int) -> np.ndarray:
  """The whole image squashed to uint8 [height, width, 3]; normalised boxes are unchanged."""
  if image.size != (width, height):
    image = image.resize((width, height), _RESAMPLE, reducing_gap=3.0)
  return np.asarray(image, np.uint8)


def eval_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 `[size, size, 3]` as evaluation and search see them.

  A JPEG decodes at the smallest draft scale that keeps both sides >= size, then the
  whole image is squashed to size x size.
  """
  return resize(folder.decode_rgb(data, size), size, size)


def random_resized_crop(image: Image.Image, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.6, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Image.Image:
  """A random crop of `scale` of the area and aspect in `ratio`, resized to size x size."""
  width, height = image.size
  area = width * height * rng.uniform(*scale)
  aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
  w = min(width, math.sqrt(area * aspect))
  h = min(height, math.sqrt(area / aspect))
  x0 = rng.uniform(0, width - w)
  y0 = rng.uniform(0, height - h)
  return image.resize((size, size), _RESAMPLE, box=(x0, y0, x0 + w, y0 + h))


def color_jitter(pixels: np.ndarray, rng: np.random.Generator,
                 strength: float = 0.25) -> np.ndarray:
  """Random brightness, contrast and saturation in [1 - strength, 1 + strength].

  pixels: uint8 [H, W, 3] -> uint8 [H, W, 3].
  """
  x = pixels.astype(np.float32) * rng.uniform(1 - strength, 1 + strength)
  mean = x.mean()
  x = mean + (x - mean) * rng.uniform(1 - strength, 1 + strength)
  gray = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
  x = gray[..., None] + (x - gray[..., None]) * rng.uniform(1 - strength, 1 + strength)
  return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def augment_query(image: Image.Image, rng: np.random.Generator, size: int,
                  flip_and_jitter: bool = True) -> np.ndarray:
  """Training query: random resized crop, then (unless `flip_and_jitter` is False:
  the train step does them, tigerfg_jax/data/device_augment.py) horizontal flip (p=0.5)
  and colour jitter.

  Returns uint8 [size, size, 3].
  """
  crop = random_resized_crop(image, rng, size)
  if not flip_and_jitter:
    return np.asarray(crop, np.uint8)
  if rng.random() < 0.5:
    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return color_jitter(np.asarray(crop, np.uint8), rng)


def mosaic_tiles(size: int, grid: int) -> np.ndarray:
  """int [grid * grid, 4]: pixel rectangles x0, y0, x1, y1 of the tiles, row-major."""
  edges = np.round(np.arange(grid + 1) * size / grid).astype(int)
  return np.asarray([[edges[c], edges[r], edges[c + 1], edges[r + 1]]
                     for r in range(grid) for c in range(grid)])


def mosaic(images: Sequence[Image.Image], size: int, grid: int) -> np.ndarray:
  """grid * grid images (row-major) tiled into uint8 [size, size, 3]."""
  if len(images) != grid * grid:
    raise ValueError(f"a {grid}x{grid} mosaic needs {grid * grid} images, got {len(images)}")
  canvas = np.empty((size, size, 3), np.uint8)
  for image, (x0, y0, x1, y1) in zip(images, mosaic_tiles(size, grid)):
    canvas[y0:y1, x0:x1] = resize(image, x1 - x0, y1 - y0)
  return canvas


def box_in_tile(box: np.ndarray | None, tile: Sequence[int], size: int) -> np.ndarray:
  """A normalised box of a tile's image -> float32 [4] normalised in the mosaic.

  Without a box the tile itself is the target's box: the item fills its tile.
  """
  x0, y0, x1, y1 = (float(v) for v in tile)
  b = np.asarray((0.0, 0.0, 1.0, 1.0) if box is None else box, np.float64)
  return (np.asarray([x0 + b[0] * (x1 - x0), y0 + b[1] * (y1 - y0),
                      x0 + b[2] * (x1 - x0), y0 + b[3] * (y1 - y0)]) / size).astype(np.float32)
