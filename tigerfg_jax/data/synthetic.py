r"""Procedural e-commerce catalog written in the dataset folder format.

Products are a kind (round handbag, square box, shirt, ...), a colour and a pattern
(plain, or stripes / dots / checks in an accent colour); titles name them in words,
the pattern only sometimes ("red round handbag", "red round handbag with white
stripes"): the title says which object is meant, the image what it looks like. Each
split (`train`, `eval_normal`, `eval_cluttered`) is its own catalog:

* `normal` item images show the product alone on a plain background;
* `cluttered` item images show it among distractor products on a busy background, each
  product in one cell of a `clutter_grid x clutter_grid` layout (2-5 distractors, at
  most one per free cell).
  Distractors are other products of the same split where possible, some of the same
  kind in another colour, so a query for product B has hard negatives: images that
  contain B but whose title names A;
* `train` holds both kinds of item images, half each.

Every split also has typed queries (`text_queries.jsonl`, `synthetic_text`): attribute
phrases, most naming the pattern the titles usually omit.
Every item gets one query: the product rendered anew (scale, shift, rotation, blur,
colour jitter, JPEG) whose `box` is the product's box in the item image. With
`one_to_many=True` a product is listed by 1-3 items (other renderings and backgrounds,
titles differing by a listing word) and each query names all of them as positives.

Item and query ids name their split (`eval_normal-item-00003`), so ids are unique
across splits: the items of any split can join an export's catalog of another.

  python -m tigerfg_jax.data.synthetic --out=DIR [--seed=0 --items=400 --image_size=64]

The CLI writes like `write_catalog_once`: a folder already holding this catalog is left
as it is, one holding another catalog (or anything else) is refused.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tigerfg_jax.data import synthetic_text

SPLITS = ("train", "eval_normal", "eval_cluttered")
# The optional large catalog for text queries (`write_catalog(text_eval_items=)`).
TEXT_EVAL_SPLIT = "eval_text"

COLOURS = {
    "red": (215, 35, 35),
    "orange": (240, 135, 20),
    "yellow": (235, 205, 25),
    "green": (45, 160, 55),
    "teal": (0, 140, 140),
    "blue": (35, 75, 215),
    "purple": (125, 55, 185),
    "pink": (240, 115, 175),
    "brown": (125, 75, 35),
    "gray": (125, 125, 125),
}
# Pattern accents: any product colour but the base, or white / black.
ACCENTS = {**COLOURS, "white": (250, 250, 250), "black": (25, 25, 25)}
PATTERNS = ("plain", "stripes", "dots", "checks")
# Listing words that tell apart the titles of items sharing a product (one_to_many).
LISTING_WORDS = ("", "new", "classic")
# How often a patterned product's title names the pattern (see Product.listing_title).
TITLE_PATTERN_PROB = 0.25
# The text queries' random stream (`[seed, split, _TEXT_STREAM]`): apart from the items'.
_TEXT_STREAM = 1_000_000
# Version of what a catalog holds; a catalog written by another version is not reused.
# 2: text_queries.jsonl in every split.
CATALOG_VERSION = 2
# Cells per side of a cluttered image's layout (see write_catalog).
CLUTTER_GRID = 2

Point = tuple[float, float]


def _star(cx: float, cy: float, r_out: float, r_in: float) -> list[Point]:
  angles = [math.pi * (k / 5 - 0.5) for k in range(10)]
  return [(cx + (r_out if k % 2 == 0 else r_in) * math.cos(a),
           cy + (r_out if k % 2 == 0 else r_in) * math.sin(a))
          for k, a in enumerate(angles)]


# Each kind draws its silhouette (fill 255) into a square 'L' canvas. Coordinates are
# fractions of the canvas side so one drawing serves every resolution.
def _handbag(d, s):
  d.ellipse([0.08 * s, 0.36 * s, 0.92 * s, 0.96 * s], fill=255)
  d.ellipse([0.28 * s, 0.06 * s, 0.72 * s, 0.62 * s], outline=255, width=max(1, int(0.07 * s)))


def _box(d, s):
  d.rectangle([0.12 * s, 0.12 * s, 0.88 * s, 0.88 * s], fill=255)


def _sign(d, s):
  d.polygon([(0.5 * s, 0.05 * s), (0.96 * s, 0.9 * s), (0.04 * s, 0.9 * s)], fill=255)


def _shirt(d, s):
  d.polygon([(x * s, y * s) for x, y in [
      (0.32, 0.06), (0.68, 0.06), (0.96, 0.3), (0.84, 0.46), (0.73, 0.38), (0.73, 0.95),
      (0.27, 0.95), (0.27, 0.38), (0.16, 0.46), (0.04, 0.3)]], fill=255)


def _bottle(d, s):
  d.rectangle([0.41 * s, 0.04 * s, 0.59 * s, 0.32 * s], fill=255)
  d.rounded_rectangle([0.26 * s, 0.28 * s, 0.74 * s, 0.96 * s], radius=0.1 * s, fill=255)


def _mug(d, s):
  d.ellipse([0.5 * s, 0.32 * s, 0.92 * s, 0.76 * s], outline=255, width=max(1, int(0.08 * s)))
  d.rectangle([0.1 * s, 0.18 * s, 0.7 * s, 0.9 * s], fill=255)


def _hat(d, s):
  d.pieslice([0.22 * s, 0.14 * s, 0.78 * s, 0.96 * s], 180, 360, fill=255)
  d.rounded_rectangle([0.04 * s, 0.5 * s, 0.96 * s, 0.68 * s], radius=0.06 * s, fill=255)


def _ornament(d, s):
  d.polygon([(x * s, y * s) for x, y in _star(0.5, 0.54, 0.47, 0.2)], fill=255)


def _lamp(d, s):
  d.polygon([(0.3 * s, 0.06 * s), (0.7 * s, 0.06 * s), (0.88 * s, 0.5 * s),
             (0.12 * s, 0.5 * s)], fill=255)
  d.rectangle([0.45 * s, 0.5 * s, 0.55 * s, 0.86 * s], fill=255)
  d.rectangle([0.26 * s, 0.84 * s, 0.74 * s, 0.95 * s], fill=255)


def _umbrella(d, s):
  d.pieslice([0.04 * s, 0.08 * s, 0.96 * s, 0.92 * s], 180, 360, fill=255)
  d.rectangle([0.46 * s, 0.48 * s, 0.54 * s, 0.9 * s], fill=255)
  d.arc([0.3 * s, 0.78 * s, 0.54 * s, 0.98 * s], 0, 180, fill=255, width=max(1, int(0.07 * s)))


def _shoe(d, s):
  d.polygon([(x * s, y * s) for x, y in [
      (0.08, 0.22), (0.42, 0.22), (0.48, 0.52), (0.86, 0.6), (0.96, 0.74), (0.94, 0.86),
      (0.08, 0.86)]], fill=255)


def _pillow(d, s):
  d.ellipse([0.06 * s, 0.1 * s, 0.54 * s, 0.58 * s], fill=255)
  d.ellipse([0.46 * s, 0.1 * s, 0.94 * s, 0.58 * s], fill=255)
  d.polygon([(0.08 * s, 0.42 * s), (0.92 * s, 0.42 * s), (0.5 * s, 0.94 * s)], fill=255)


KINDS: dict[str, Callable[[ImageDraw.ImageDraw, float], None]] = {
    "round handbag": _handbag,
    "square box": _box,
    "triangle sign": _sign,
    "shirt": _shirt,
    "bottle": _bottle,
    "mug": _mug,
    "hat": _hat,
    "star ornament": _ornament,
    "table lamp": _lamp,
    "umbrella": _umbrella,
    "shoe": _shoe,
    "heart pillow": _pillow,
}


@dataclasses.dataclass(frozen=True)
class Product:
  """One product: names from KINDS, COLOURS, PATTERNS and ACCENTS (None when plain)."""
  kind: str
  colour: str
  pattern: str
  accent: str | None

  @property
  def title(self) -> str:
    """The full description: colour, kind and pattern."""
    if self.pattern == "plain":
      return f"{self.colour} {self.kind}"
    return f"{self.colour} {self.kind} with {self.accent} {self.pattern}"

  def listing_title(self, rng: np.random.Generator, pattern_prob: float) -> str:
    """A seller's title: colour and kind always, the pattern only sometimes.

    Real titles rarely describe everything the photo shows, so with `pattern_prob` < 1
    items that share colour and kind are told apart by their images alone.
    """
    if self.pattern != "plain" and rng.random() < pattern_prob:
      return self.title
    return f"{self.colour} {self.kind}"


def product_space() -> tuple[list[Product], np.ndarray]:
  """All products and sampling weights that give each pattern the same total mass."""
  products, weights = [], []
  for kind in KINDS:
    for colour in COLOURS:
      products.append(Product(kind, colour, "plain", None))
      weights.append(1.0)
      accents = [a for a in ACCENTS if a != colour]
      for pattern in PATTERNS[1:]:
        for accent in accents:
          products.append(Product(kind, colour, pattern, accent))
          weights.append(1.0 / len(accents))
  weights = np.asarray(weights)
  return products, weights / weights.sum()


def sample_products(rng: np.random.Generator, count: int) -> list[Product]:
  """`count` distinct products (all of them, repeated, when the space is smaller)."""
  space, weights = product_space()
  chosen = rng.choice(len(space), size=min(count, len(space)), replace=False, p=weights)
  return [space[i] for i in np.resize(chosen, count)]


# ---------------------------------------------------------------------------- rendering


def _pattern_mask(pattern: str, side: int, rng: np.random.Generator) -> np.ndarray:
  """bool [side, side]: where the accent colour shows; the period scales with `side`."""
  period = side / rng.uniform(4.0, 5.0)
  offset = rng.uniform(0, period, size=2)[:, None, None]
  yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) + offset
  if pattern == "stripes":
    angle = rng.uniform(-0.4, 0.4) + math.pi / 4
    return ((xx * math.cos(angle) + yy * math.sin(angle)) / period) % 1.0 < 0.42
  if pattern == "dots":
    dx, dy = (xx / period) % 1.0 - 0.5, (yy / period) % 1.0 - 0.5
    return dx * dx + dy * dy < 0.09
  if pattern == "checks":
    return (np.floor(xx / period) + np.floor(yy / period)) % 2 == 0
  return np.zeros((side, side), bool)


def render_product(product: Product, side: int, rng: np.random.Generator) -> Image.Image:
  """The product as an RGBA image `side` x `side` (transparent around its silhouette).

  Drawn at twice the size and reduced, so the edges are anti-aliased; a darker outline
  keeps the silhouette readable on a background of similar colour.
  """
  big = 2 * side
  mask = Image.new("L", (big, big), 0)
  KINDS[product.kind](ImageDraw.Draw(mask), big)
  rgb = np.empty((big, big, 3), np.float32)
  rgb[:] = COLOURS[product.colour]
  if product.accent is not None:
    rgb[_pattern_mask(product.pattern, big, rng)] = ACCENTS[product.accent]
  # Erosion as "the whole box-blur window is inside": O(1) per pixel, unlike MinFilter.
  inner = np.asarray(mask.filter(ImageFilter.BoxBlur(max(1, big // 48)))) >= 250
  rgb[(np.asarray(mask) > 127) & ~inner] *= 0.55
  rgba = np.dstack([rgb.astype(np.uint8), np.asarray(mask)])
  return Image.fromarray(rgba, "RGBA").resize((side, side), Image.Resampling.BOX)


def _alpha_box(product: Image.Image, x: int, y: int) -> list[int]:
  """[x0, y0, x1, y1] of the product's opaque pixels once pasted at (x, y)."""
  x0, y0, x1, y1 = product.getchannel("A").point(lambda a: 255 if a >= 128 else 0).getbbox()
  return [x + x0, y + y0, x + x1, y + y1]


def _plain_background(size: int, rng: np.random.Generator) -> Image.Image:
  tone = rng.uniform(205, 250) + rng.uniform(-12, 12, size=3)
  return Image.new("RGB", (size, size), tuple(int(v) for v in np.clip(tone, 0, 255)))


def _busy_background(size: int, rng: np.random.Generator) -> Image.Image:
  """A muted gradient under random faint shapes and pixel noise."""
  c0, c1 = rng.uniform(60, 200, size=(2, 3))
  t = np.linspace(0.0, 1.0, size, dtype=np.float32)
  ramp = t[None, :] if rng.random() < 0.5 else t[:, None]
  image = Image.fromarray(
      (c0 + (c1 - c0) * ramp[..., None] * np.ones((size, size, 1))).astype(np.uint8))
  draw = ImageDraw.Draw(image, "RGBA")
  for _ in range(rng.integers(8, 15)):
    colour = tuple(int(v) for v in rng.uniform(40, 220, size=3)) + (int(rng.uniform(60, 140)),)
    x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
    w, h = rng.uniform(0.1, 0.5, size=2) * size
    shape = rng.integers(3)
    if shape == 0:
      draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
    elif shape == 1:
      draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
    else:
      draw.line([x0, y0, x0 + w, y0 + h], fill=colour, width=max(1, int(size * 0.03)))
  noise = rng.normal(0.0, 8.0, size=(size, size, 3))
  return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def render_normal(product: Product, size: int, rng: np.random.Generator):
  """(RGB image [size, size], box): the product alone on a plain background."""
  image = _plain_background(size, rng)
  side = int(size * rng.uniform(0.55, 0.8))
  sprite = render_product(product, side, rng)
  x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
  image.paste(sprite, (x, y), sprite)
  return image, _alpha_box(sprite, x, y)


def render_cluttered(product: Product, distractors: list[Product], size: int,
                     rng: np.random.Generator, grid: int = CLUTTER_GRID):
  """(RGB image, box): the product among `distractors` on a busy background.

  The image is cut into `grid x grid` cells; the target takes one cell (0.8-1.0 of the
  cell side), each distractor another (the first `grid**2 - 1` of them) and may spill
  a little into its neighbours. The target is pasted last so no distractor hides it.
  """
  image = _busy_background(size, rng)
  cell = size / grid
  cells = rng.permutation(grid * grid)
  for product_d, c in zip(distractors, cells[1:]):
    side = max(4, int(cell * rng.uniform(0.7, 1.0)))
    sprite = render_product(product_d, side, rng)
    x = int((c % grid) * cell + rng.uniform(-0.15, 0.15) * cell + (cell - side) / 2)
    y = int((c // grid) * cell + rng.uniform(-0.15, 0.15) * cell + (cell - side) / 2)
    image.paste(sprite, (x, y), sprite)
  side = max(4, int(cell * rng.uniform(0.8, 1.0)))
  sprite = render_product(product, side, rng)
  x = int((cells[0] % grid) * cell + rng.uniform(0, cell - side + 1e-6))
  y = int((cells[0] // grid) * cell + rng.uniform(0, cell - side + 1e-6))
  image.paste(sprite, (x, y), sprite)
  return image, _alpha_box(sprite, x, y)


def render_query(product: Product, size: int, rng: np.random.Generator) -> bytes:
  """JPEG bytes of a new rendering of the product filling most of the frame."""
  image = _plain_background(size, rng)
  side = int(size * rng.uniform(0.7, 0.95))
  sprite = render_product(product, side, rng).rotate(
      rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC, expand=True)
  x = int((size - sprite.width) / 2 + rng.uniform(-0.08, 0.08) * size)
  y = int((size - sprite.height) / 2 + rng.uniform(-0.08, 0.08) * size)
  image.paste(sprite, (x, y), sprite)
  image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6) * size / 64))
  gain = rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.85, 1.15)
  pixels = np.clip(np.asarray(image, np.float32) * gain, 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG", quality=int(rng.integers(50, 91)))
  return out.getvalue()


# ------------------------------------------------------------------------------ catalog


def _distractors(target: Product, pool: list[Product], rng: np.random.Generator) -> list[Product]:
  """2-5 products for a cluttered image: from `pool` (the split's own products) where
  possible; about half of them the target's kind in another colour."""
  same_kind = [p for p in pool if p.kind == target.kind and p.colour != target.colour]
  other_kind = [p for p in pool if p.kind != target.kind]
  chosen = []
  for _ in range(rng.integers(2, 6)):
    if rng.random() < 0.5:
      if same_kind:
        chosen.append(same_kind[rng.integers(len(same_kind))])
      else:
        colour = rng.choice([c for c in COLOURS if c != target.colour])
        chosen.append(Product(target.kind, str(colour), "plain", None))
    elif other_kind:
      chosen.append(other_kind[rng.integers(len(other_kind))])
    else:
      kind = rng.choice([k for k in KINDS if k != target.kind])
      chosen.append(Product(str(kind), str(rng.choice(list(COLOURS))), "plain", None))
  return chosen


def _item_products(rng: np.random.Generator, items: int,
                   one_to_many: bool) -> tuple[list[Product], list[int]]:
  """The split's products and, per item, which of them it lists."""
  if not one_to_many:
    return sample_products(rng, items), list(range(items))
  copies = []
  while sum(copies) < items:
    copies.append(min(int(rng.integers(1, 4)), items - sum(copies)))
  products = sample_products(rng, len(copies))
  return products, [p for p, n in enumerate(copies) for _ in range(n)]


def _item_id(split_name: str, index: int) -> str:
  return f"{split_name}-item-{index:05d}"


def write_split(split_dir: str, *, seed: int, split_index: int, items: int, image_size: int,
                cluttered_fraction: float, one_to_many: bool,
                title_pattern_prob: float, clutter_grid: int = CLUTTER_GRID) -> None:
  """Writes one split: items.jsonl, queries.jsonl, text_queries.jsonl, items/*.png,
  queries/*.jpg.

  Ids start with the split folder's name, so they are unique across the splits.
  """
  split_name = os.path.basename(os.path.normpath(split_dir))
  rng = np.random.default_rng([seed, split_index])
  products, product_of_item = _item_products(rng, items, one_to_many)
  items_of_product: dict[int, list[int]] = {}
  for i, p in enumerate(product_of_item):
    items_of_product.setdefault(p, []).append(i)
  # Repeated titles get a model number, so that titles are unique per item.
  model_number: dict[str, int] = {}
  os.makedirs(os.path.join(split_dir, "items"), exist_ok=True)
  os.makedirs(os.path.join(split_dir, "queries"), exist_ok=True)
  item_lines, query_lines = [], []
  for i, p in enumerate(product_of_item):
    product = products[p]
    item_rng = np.random.default_rng([seed, split_index, i])
    if item_rng.random() < cluttered_fraction:
      image, box = render_cluttered(
          product, _distractors(product, products, item_rng), image_size, item_rng,
          clutter_grid)
    else:
      image, box = render_normal(product, image_size, item_rng)
    image_path = f"items/{i:05d}.png"
    image.save(os.path.join(split_dir, image_path), "PNG")
    copy = items_of_product[p].index(i)
    title = " ".join(w for w in (LISTING_WORDS[copy],
                                 product.listing_title(item_rng, title_pattern_prob)) if w)
    model_number[title] = model_number.get(title, 0) + 1
    if model_number[title] > 1:
      title += f" model {model_number[title]}"
    item_id = _item_id(split_name, i)
    item_lines.append({"item_id": item_id, "image": image_path, "title": title})
    query_path = f"queries/{i:05d}.jpg"
    with open(os.path.join(split_dir, query_path), "wb") as f:
      f.write(render_query(product, image_size, item_rng))
    positives = [item_id] + [_item_id(split_name, j) for j in items_of_product[p] if j != i]
    query_lines.append({"query_id": f"{split_name}-query-{i:05d}", "image": query_path,
                        "item_ids": positives, "box": box})
  text_lines = synthetic_text.text_queries(
      split_name, products, product_of_item, [line["item_id"] for line in item_lines],
      np.random.default_rng([seed, split_index, _TEXT_STREAM]))
  for name, lines in (("items.jsonl", item_lines), ("queries.jsonl", query_lines),
                      ("text_queries.jsonl", text_lines)):
    with open(os.path.join(split_dir, name), "w", encoding="utf-8") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)


def eval_split_items(items: int) -> int:
  """Items of each eval split by default: a quarter of train but at least 50 (all of
  train when it has fewer than 50)."""
  return max(items // 4, min(items, 50))


# A cell of a cluttered image must hold a product of a few pixels a side.
MIN_CELL_SIDE = 8
MIN_IMAGE_SIZE = 16


class CatalogError(ValueError):
  """Impossible catalog parameters or an output folder that cannot take the catalog;
  one line per problem."""


def check_params(*, seed: int, items: int, image_size: int, eval_items: int | None,
                 clutter_grid: int, title_pattern_prob: float) -> list[str]:
  """One line per impossible write_catalog argument (empty when all are fine)."""
  problems = []
  if seed < 0:
    problems.append(f"seed={seed}: expected an integer >= 0")
  if items < 1:
    problems.append(f"items={items}: the train split needs at least 1 item")
  if eval_items is not None and eval_items < 1:
    problems.append(f"eval_items={eval_items}: each eval split needs at least 1 item "
                    "(0 or None: the default)")
  if clutter_grid < 2:
    problems.append(f"clutter_grid={clutter_grid}: a cluttered image needs a grid of at "
                    "least 2 x 2 cells (the target and a distractor)")
  if image_size < max(MIN_IMAGE_SIZE, MIN_CELL_SIDE * clutter_grid):
    problems.append(
        f"image_size={image_size}: too small; need at least {MIN_IMAGE_SIZE} and "
        f"{MIN_CELL_SIDE} px per cell of the {clutter_grid} x {clutter_grid} clutter grid "
        f"({MIN_CELL_SIDE * clutter_grid} px)")
  if not 0.0 <= title_pattern_prob <= 1.0:
    problems.append(f"title_pattern_prob={title_pattern_prob}: expected a probability "
                    "in [0, 1]")
  return problems


def write_catalog(out_dir: str, *, seed: int, items: int, image_size: int,
                  one_to_many: bool = False,
                  title_pattern_prob: float = TITLE_PATTERN_PROB,
                  eval_items: int | None = None, clutter_grid: int = CLUTTER_GRID,
                  text_eval_items: int = 0) -> None:
  """Writes the splits train (half cluttered), eval_normal, eval_cluttered to out_dir
  (and eval_text with `text_eval_items` > 0).

  `title_pattern_prob`: how often a patterned product's title names its pattern (1: titles
  describe products completely, and the title alone identifies the product).
  `eval_items`: items of each eval split (None: `eval_split_items(items)`).
  `text_eval_items` > 0: also `eval_text`, a catalog of that many items (half
  cluttered) for the typed queries: at catalog scale many items share the words a title
  gives (kind, colour), so a text query's top 10 are not decided by the title alone, as
  in a 200-item split where a kind and colour name about two items.
  `clutter_grid`: cluttered images are a `clutter_grid x clutter_grid` layout of cells,
  one product per cell: 2 puts the target at 0.4-0.5 of the image side (about 3-4
  patches of 8 px at 64 px, as a target of 0.3 of a 224 px image has at 16 px patches),
  3 at 0.27-0.33.

  Deterministic: the same arguments give byte-identical files. Raises CatalogError for
  impossible arguments (see `check_params`) and when `out_dir` is not empty, so a
  catalog is never mixed with the files of another.
  """
  problems = check_params(seed=seed, items=items, image_size=image_size,
                          eval_items=eval_items, clutter_grid=clutter_grid,
                          title_pattern_prob=title_pattern_prob)
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    problems.append(f"{out_dir}: not empty; write a catalog into a new or empty folder")
  if problems:
    raise CatalogError("\n".join(problems))
  if text_eval_items < 0:
    raise CatalogError(f"text_eval_items={text_eval_items}: expected >= 0 (0: no eval_text)")
  eval_items = eval_split_items(items) if eval_items is None else eval_items
  sizes = {"train": (items, 0.5), "eval_normal": (eval_items, 0.0),
           "eval_cluttered": (eval_items, 1.0), TEXT_EVAL_SPLIT: (text_eval_items, 0.5)}
  for index, split in enumerate(SPLITS + ((TEXT_EVAL_SPLIT,) if text_eval_items else ())):
    count, cluttered = sizes[split]
    write_split(os.path.join(out_dir, split), seed=seed, split_index=index, items=count,
                image_size=image_size, cluttered_fraction=cluttered, one_to_many=one_to_many,
                title_pattern_prob=title_pattern_prob, clutter_grid=clutter_grid)


CATALOG_MARKER = "synthetic.json"


def resolved_params(params: dict) -> dict:
  """write_catalog's keyword arguments with every default filled in (eval_items too),
  so two requests for the same catalog compare equal however they were spelled."""
  signature = inspect.signature(write_catalog)
  full = {name: p.default for name, p in signature.parameters.items()
          if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not p.empty}
  full.update(params)
  if full["eval_items"] is None:
    full["eval_items"] = eval_split_items(full["items"])
  return full


def _differences(old: dict, new: dict) -> tuple[str, str]:
  keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
  return (", ".join(f"{k}={old.get(k)}" for k in keys),
          ", ".join(f"{k}={new.get(k)}" for k in keys))


def _existing_catalog(root: str, wanted: dict) -> bool:
  """True when `root` holds the catalog `wanted`, False when it is absent or empty.

  Raises CatalogError (one line) when it holds another catalog or something else.
  """
  marker = os.path.join(root, CATALOG_MARKER)
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      written = resolved_params(json.load(f))
    written.setdefault("version", 1)  # written before versions were recorded.
    if written != wanted:
      old, new = _differences(written, wanted)
      raise CatalogError(f"{root} holds a synthetic catalog written with {old}, not {new}; "
                         f"use another folder, or delete {root} to write the new one")
    return True
  if os.path.isdir(root) and os.listdir(root):
    raise CatalogError(f"{root} is not empty and has no {CATALOG_MARKER}: it is not a "
                       "synthetic catalog written by this tool; use another folder or "
                       "empty it")
  if os.path.exists(root) and not os.path.isdir(root):
    raise CatalogError(f"{root} is a file, not a folder")
  return False


def write_catalog_once(root: str, **params) -> str:
  """Writes the catalog `params` (write_catalog's arguments) to `root` unless it is there.

  Written to a temporary folder and renamed into place, so processes racing to write it
  (multi-host) or a run killed half-way never leave a partial catalog behind. A root
  that holds a catalog written with other parameters, or anything not written by this
  function, is refused (CatalogError), never replaced: it may be the data an existing
  run, its cache and its exports were made from. Returns `root`.
  """
  wanted = dict(resolved_params(params), version=CATALOG_VERSION)
  problems = check_params(**{k: wanted[k] for k in ("seed", "items", "image_size", "eval_items",
                                                    "clutter_grid", "title_pattern_prob")})
  if problems:
    raise CatalogError("\n".join(problems))
  if _existing_catalog(root, wanted):
    return root
  parent = os.path.dirname(os.path.abspath(root))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".catalog-", dir=parent)
  try:
    write_catalog(tmp, **params)
    with open(os.path.join(tmp, CATALOG_MARKER), "w", encoding="utf-8") as f:
      json.dump(wanted, f, sort_keys=True)
    os.rename(tmp, root)  # Also replaces an empty folder.
  except OSError:
    if not _existing_catalog(root, wanted):  # else another process won the race.
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return root


def catalog_root(data_config, workdir: str) -> str:
  """The dataset root of a run: `data_config.root`, or the synthetic catalog.

  The synthetic catalog (`data_config.synthetic_*`) is written to `workdir/data` once
  (`write_catalog_once`).
  """
  if data_config.root:
    return data_config.root
  return write_catalog_once(os.path.join(workdir, "data"), **catalog_params(data_config))


def catalog_params(data_config) -> dict:
  """`write_catalog` arguments from `config.data`'s synthetic_* keys."""
  return dict(seed=data_config.synthetic_seed, items=data_config.synthetic_items,
              image_size=data_config.synthetic_image_size,
              eval_items=data_config.synthetic_eval_items or None,
              clutter_grid=data_config.synthetic_clutter_grid,
              text_eval_items=data_config.synthetic_text_eval_items)


def main(argv):
  del argv
  params = dict(seed=FLAGS.seed, items=FLAGS.items, image_size=FLAGS.image_size,
                one_to_many=FLAGS.one_to_many, title_pattern_prob=FLAGS.title_pattern_prob,
                eval_items=FLAGS.eval_items or None, clutter_grid=FLAGS.clutter_grid,
                text_eval_items=FLAGS.text_eval_items)
  existed = os.path.exists(os.path.join(FLAGS.out, CATALOG_MARKER))
  try:
    write_catalog_once(FLAGS.out, **params)
  except CatalogError as e:
    for line in str(e).splitlines():
      print(f"error: {line}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:
    print(f"error: cannot write the catalog to {FLAGS.out}: {e}", file=sys.stderr)
    sys.exit(1)
  if existed:
    print(f"{FLAGS.out} already holds this catalog; nothing written")
  else:
    written = SPLITS + ((TEXT_EVAL_SPLIT,) if FLAGS.text_eval_items else ())
    print(f"wrote splits {', '.join(written)} to {FLAGS.out}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("out", None, "output dataset root: a new or empty folder (or one "
                      "holding this very catalog, which is then left as it is)",
                      required=True)
  flags.DEFINE_integer("seed", 0, "catalog seed (>= 0)")
  flags.DEFINE_integer("items", 400, "items of the train split (>= 1)")
  flags.DEFINE_integer("eval_items", 0, "items of each eval split (0: max(items // 4, "
                       "min(items, 50)), i.e. a quarter of train but at least 50, or all "
                       "of train when it has fewer)")
  flags.DEFINE_integer("text_eval_items", 0, "items of an eval_text split for typed "
                       "queries (0: none)")
  flags.DEFINE_integer("clutter_grid", CLUTTER_GRID,
                       "cluttered images: a grid x grid layout, one product per cell (>= 2)")
  flags.DEFINE_integer("image_size", 64,
                       f"side of item and query images in pixels (>= {MIN_IMAGE_SIZE} "
                       f"and >= {MIN_CELL_SIDE} x clutter_grid)")
  flags.DEFINE_bool("one_to_many", False, "several items per product")
  flags.DEFINE_float("title_pattern_prob", TITLE_PATTERN_PROB,
                     "how often a title names its product's pattern, in [0, 1]")
  FLAGS = flags.FLAGS
  app.run(main)
