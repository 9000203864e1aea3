"""Box -> target distribution over the patch grid (the spatial-map supervision).

Boxes are `x0, y0, x1, y1`, in pixels or normalised to [0, 1] of the image. The target
of a box is the fraction of each patch it covers, normalised to sum 1, row-major over
the `grid x grid` patches (grid = image side / patch side); uniform without a box.
Callers move the box through resize / crop / Mosaic first, then call `patch_target`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def normalize_box(box: Sequence[float], width: float, height: float) -> np.ndarray:
  """Pixel box of a `width` x `height` image -> float32 [4] in [0, 1]."""
  x0, y0, x1, y1 = box
  return np.clip(np.asarray([x0 / width, y0 / height, x1 / width, y1 / height],
                            np.float32), 0.0, 1.0)


def grid_size(image_size: int, patch_size: int) -> int:
  if image_size % patch_size:
    raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
  return image_size // patch_size


def _cell_overlap(lo: np.ndarray, hi: np.ndarray, grid: int) -> np.ndarray:
  """[B, grid]: fraction of each 1/grid-wide cell that lies inside [lo, hi]."""
  edges = np.arange(grid + 1, dtype=np.float64) / grid
  inside = (np.minimum(hi[:, None], edges[None, 1:]) - np.maximum(lo[:, None], edges[None, :-1]))
  return np.clip(inside, 0.0, None) * grid


def patch_targets(boxes: np.ndarray, has_box: np.ndarray, grid: int) -> np.ndarray:
  """Normalised boxes float [B, 4], has_box bool [B] -> float32 [B, grid * grid].

  Row b is the covered fraction of each patch (row-major), divided by its sum; rows
  without a box, or whose box covers no area, are uniform.
  """
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  cover_x = _cell_overlap(boxes[:, 0], boxes[:, 2], grid)
  cover_y = _cell_overlap(boxes[:, 1], boxes[:, 3], grid)
  cover = (cover_y[:, :, None] * cover_x[:, None, :]).reshape(len(boxes), grid * grid)
  total = cover.sum(axis=1, keepdims=True)
  usable = np.asarray(has_box, bool)[:, None] & (total > 0)
  uniform = np.full_like(cover, 1.0 / (grid * grid))
  return np.where(usable, cover / np.where(total > 0, total, 1.0), uniform).astype(np.float32)


def patch_target(box: Sequence[float] | None, grid: int) -> np.ndarray:
  """One normalised box (or None) -> float32 [grid * grid]; see `patch_targets`."""
  has_box = box is not None
  return patch_targets(np.asarray(box if has_box else (0, 0, 0, 0)), np.asarray([has_box]),
                       grid)[0]
