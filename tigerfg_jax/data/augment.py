"""Image resizing and augmentation: the evaluation resize, box crops and query jitter.
Randomness comes from an explicit `np.random.Generator`; images go in as PIL RGB (or
encoded bytes) and come out as uint8 [H, W, 3]. The item Mosaic is tigerfg_jax/data/mosaic.py.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from tigerfg_jax.data import folder

_RESAMPLE = Image.Resampling.BILINEAR
# Context around the target in the privileged teacher's crop, per side, as a fraction
# of the box's longer side.
TARGET_MARGIN = 0.1


def resize(image: Image.Image, width: int, height: int) -> np.ndarray:
  """The whole image squashed to uint8 [height, width, 3]; normalised boxes are unchanged."""
  if image.size != (width, height):
    image = image.resize((width, height), _RESAMPLE, reducing_gap=3.0)
  return np.asarray(image, np.uint8)


def crop_resize(image: Image.Image, box: Sequence[float] | None, width: int,
                height: int) -> np.ndarray:
  """The region `box` (normalised x0, y0, x1, y1; None: the whole image) of `image`,
  resized (aspect not kept) to uint8 [height, width, 3], sampled from the image's own
  pixels (sub-pixel box edges, no intermediate resize)."""
  w, h = image.size
  x0, y0, x1, y1 = (0.0, 0.0, 1.0, 1.0) if box is None else (float(v) for v in box)
  region = (x0 * w, y0 * h, x1 * w, y1 * h)
  return np.asarray(image.resize((width, height), _RESAMPLE, box=region, reducing_gap=3.0),
                    np.uint8)


def context_box(box: Sequence[float], width: float, height: float,
                margin: float = TARGET_MARGIN) -> np.ndarray:
  """The square region around a normalised `box` of a `width` x `height` image.

  The box's longer side grows by `margin` of it on each side and the shorter side to
  the same length, about the box's centre (in pixels, so the crop keeps the product's
  aspect when resized to a square); the square is shifted inside the image, and
  clipped where it is larger than the image. Returns float64 [4], normalised.
  """
  x0, y0, x1, y1 = (float(v) for v in box)
  side = max((x1 - x0) * width, (y1 - y0) * height) * (1 + 2 * margin)

  def span(lo: float, hi: float, extent: float) -> tuple[float, float]:
    length = min(side, extent)
    start = min(max((lo + hi) / 2 * extent - length / 2, 0.0), extent - length)
    return start / extent, (start + length) / extent

  (left, right), (top, bottom) = span(x0, x1, width), span(y0, y1, height)
  return np.asarray([left, top, right, bottom], np.float64)


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
