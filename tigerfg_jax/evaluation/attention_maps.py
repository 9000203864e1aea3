r"""Pictures of the implicit grounding: where the title makes the item tower look.

  python -m tigerfg_jax.evaluation.attention_maps --workdir=DIR [--split=eval_cluttered] [--n=8] \
      [--seed=S] [--out=grid.png] [--cell=192]

For the first N queries of a split (or N drawn with --seed), one figure row each: the
query crop; its first positive item image with the target box outlined; the same image
under the text-guided pooling's attention map (mean over heads, patch grid upsampled to
the image, blue = low, red = high), box outlined again; under them the item's title and
the map's peak as a multiple of uniform attention. Model, parameters and tokenizer come
from the run in DIR, images from the split through the data package. Small images are
upscaled to `cell` pixels so the figure stays readable.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from absl import flags

from tigerfg_jax import cli
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import augment, folder
from tigerfg_jax.models import towers

BOX_COLOUR = (0, 255, 0)
BOX_WIDTH = 2
COLUMN_NAMES = ("query", "item + target box", "text-guided attention")
# Heat-map colour stops from low to high attention: blue, cyan, yellow, red.
_HEAT_STOPS = np.asarray([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0]], np.float64)


@dataclasses.dataclass(frozen=True)
class Layout:
  """Pixel geometry of the figure.

  A header line of column names, then per row: `pad`, the image cells (`cell` square,
  `pad` apart, `pad` from the sides), `text_lines` lines of `line_height` for the
  caption; `pad` at the bottom.
  """
  cell: int = 192
  pad: int = 8
  line_height: int = 16
  text_lines: int = 3
  font_size: int = 13
  columns: int = len(COLUMN_NAMES)

  @property
  def header_height(self) -> int:
    return self.pad + self.line_height

  @property
  def row_height(self) -> int:
    return self.pad + self.cell + self.text_lines * self.line_height

  def size(self, rows: int) -> tuple[int, int]:
    """(width, height) of a figure of `rows` rows."""
    return (self.pad + self.columns * (self.cell + self.pad),
            self.header_height + rows * self.row_height + self.pad)

  def cell_origin(self, row: int, column: int) -> tuple[int, int]:
    """Top-left pixel of an image cell."""
    return (self.pad + column * (self.cell + self.pad),
            self.header_height + row * self.row_height + self.pad)


@dataclasses.dataclass(frozen=True)
class FigureRow:
  """What one row shows.

  query: uint8 `[h, w, 3]` query image (any size). item: uint8 `[H, W, 3]` item image.
  attention: float `[g, g]` map over the item's patch grid (row-major patches).
  box: target box `x0, y0, x1, y1` in pixels of `item`, or None. title: item title.
  """
  query: np.ndarray
  item: np.ndarray
  attention: np.ndarray
  box: Sequence[float] | None
  title: str


# ------------------------------------------------------------------- drawing ---

def heat_colours(values: np.ndarray) -> np.ndarray:
  """float `[...]` in [0, 1] -> uint8 `[..., 3]`: blue (0), cyan, yellow, red (1)."""
  positions = np.linspace(0.0, 1.0, len(_HEAT_STOPS))
  values = np.clip(values, 0.0, 1.0)
  channels = [np.interp(values, positions, _HEAT_STOPS[:, c]) for c in range(3)]
  return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def upsample_grid(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """`[g, g']` -> `[height, width]`, each patch's value over the pixels it covers."""
  rows = np.arange(height) * grid.shape[0] // height
  cols = np.arange(width) * grid.shape[1] // width
  return grid[rows[:, None], cols[None, :]]


def overlay(image: np.ndarray, attention_grid: np.ndarray, alpha: float = 0.55) -> np.ndarray:
  """The heat map of `attention_grid` blended over `image`.

  Args:
    image: uint8 `[H, W, 3]`.
    attention_grid: float `[g, g]` over the patch grid; min-max scaled, so its lowest
      patch is blue and its highest red (a constant map is all blue).
    alpha: weight of the heat colours.

  Returns:
    uint8 `[H, W, 3]`.
  """
  grid = np.asarray(attention_grid, np.float64)
  spread = grid.max() - grid.min()
  scaled = (grid - grid.min()) / spread if spread > 0 else np.zeros_like(grid)
  colours = heat_colours(upsample_grid(scaled, *image.shape[:2]))
  blended = (1 - alpha) * image.astype(np.float64) + alpha * colours
  return np.round(blended).astype(np.uint8)


def box_in_cell(box: Sequence[float], image_size: tuple[int, int], cell: int) -> list[int]:
  """A box in pixels of a `(width, height)` image -> inclusive pixel rectangle in the
  `cell x cell` resized image (what `ImageDraw.rectangle` takes)."""
  width, height = image_size
  x0, y0, x1, y1 = box
  rect = [x0 * cell / width, y0 * cell / height, x1 * cell / width - 1, y1 * cell / height - 1]
  return [int(np.clip(round(v), 0, cell - 1)) for v in rect]


def wrap_text(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
  """Greedy word wrap to `width` pixels; the last line ends in '...' if text is cut."""
  lines: list[str] = []
  for word in text.split():
    if lines and font.getlength(f"{lines[-1]} {word}") <= width:
      lines[-1] = f"{lines[-1]} {word}"
    else:
      lines.append(word)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    while lines[-1] and font.getlength(lines[-1] + "...") > width:
      lines[-1] = lines[-1][:-1]
    lines[-1] += "..."
  return lines


def render_figure(rows: Sequence[FigureRow], layout: Layout = Layout()) -> Image.Image:
  """The grid of `rows` (see the module docstring) as an RGB image of `layout.size`."""
  figure = Image.new("RGB", layout.size(len(rows)), (255, 255, 255))
  draw = ImageDraw.Draw(figure)
  font = ImageFont.load_default(size=layout.font_size)
  for column, name in enumerate(COLUMN_NAMES):
    x, _ = layout.cell_origin(0, column)
    draw.text((x, layout.pad // 2), name, fill=(0, 0, 0), font=font)
  for r, row in enumerate(rows):
    item_size = (row.item.shape[1], row.item.shape[0])
    item = augment.resize(Image.fromarray(row.item), layout.cell, layout.cell)
    cells = [augment.resize(Image.fromarray(row.query), layout.cell, layout.cell), item,
             overlay(item, row.attention)]
    for column, pixels in enumerate(cells):
      image = Image.fromarray(pixels)
      if column > 0 and row.box is not None:
        ImageDraw.Draw(image).rectangle(box_in_cell(row.box, item_size, layout.cell),
                                        outline=BOX_COLOUR, width=BOX_WIDTH)
      figure.paste(image, layout.cell_origin(r, column))
    x, y = layout.cell_origin(r, 0)
    text_width = layout.columns * (layout.cell + layout.pad) - layout.pad
    peak = float(np.max(row.attention) * row.attention.size / np.sum(row.attention))
    lines = wrap_text(row.title, font, text_width, layout.text_lines - 1)
    lines.append(f"attention peak {peak:.1f}x uniform")
    for k, line in enumerate(lines):
      draw.text((x, y + layout.cell + k * layout.line_height + 2), line, fill=(0, 0, 0),
                font=font)
  return figure


# ------------------------------------------------------------------ the model ---

def attention_grids(model: towers.TigerFG, params: Any, item_image: np.ndarray,
                    title_tokens: np.ndarray, title_mask: np.ndarray,
                    grid: int) -> np.ndarray:
  """The item tower's text-guided attention, mean over heads, on the patch grid.

  Args:
    item_image: uint8 `[B, S, S, 3]` at the model's item size.
    title_tokens: int32 `[B, L]`; title_mask: bool `[B, L]`.
    grid: patches per side (S / patch size).

  Returns:
    float32 `[B, grid, grid]`, each map summing to 1.
  """
  def heads_mean(params, item_image, title_tokens, title_mask):
    _, aux = model.apply({"params": params}, item_image, title_tokens, title_mask,
                         method=towers.TigerFG.embed_item)
    return aux["attention"].mean(axis=1)

  maps = np.asarray(jax.jit(heads_mean)(params, item_image, title_tokens, title_mask))
  return maps.reshape(len(maps), grid, grid)


def pick_queries(num_queries: int, n: int, seed: int | None) -> list[int]:
  """The first n query rows, or n distinct rows drawn with `seed` (in drawn order)."""
  n = min(n, num_queries)
  if seed is None:
    return list(range(n))
  return [int(q) for q in np.random.default_rng(seed).choice(num_queries, n, replace=False)]


def figure_rows(workdir: str, split_name: str, n: int,
                seed: int | None = None) -> list[FigureRow]:
  """The FigureRows of n queries of `split_name`, with the run's attention maps."""
  config, model, params, tokenizer = workdir_lib.load_trained(workdir)
  root = workdir_lib.data_root(config, workdir)
  if not os.path.isdir(os.path.join(root, split_name)):
    raise ValueError(f"--split={split_name!r}: the run's dataset {root} has splits "
                     f"{['train', *folder.eval_splits(root)]}")
  split = workdir_lib.load_split(config, workdir, split_name, root, full_size=True)
  queries = pick_queries(split.num_queries, n, seed)
  if not queries:
    raise ValueError(f"split {split_name!r} has no queries")
  size = config.data.item_image_size
  item_rows = [split.query_positives[q][0] for q in queries]
  items = [np.asarray(folder.decode_rgb(split.items[row]["image"]), np.uint8)
           for row in item_rows]
  model_input = np.stack([augment.resize(Image.fromarray(item), size, size) for item in items])
  tokens, mask = tokenizer.encode([split.titles[row] for row in item_rows],
                                  config.model.max_title_len)
  maps = attention_grids(model, params, model_input, tokens, mask,
                         size // config.model.patch_size)
  return [FigureRow(query=np.asarray(folder.decode_rgb(split.queries[q]["image"]), np.uint8),
                    item=item, attention=attention, box=split.query_boxes[q],
                    title=split.titles[row])
          for q, row, item, attention in zip(queries, item_rows, items, maps)]


def visualize(workdir: str, split: str, n: int, out: str, *, seed: int | None = None,
              layout: Layout = Layout()) -> list[FigureRow]:
  """Draws the figure of a run's split to `out` (PNG); returns the rows it drew."""
  rows = figure_rows(workdir, split, n, seed)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  render_figure(rows, layout).save(out)
  return rows


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "a trained run's workdir", required=True)
  flags.DEFINE_string("split", "eval_cluttered", "split whose queries are shown")
  flags.DEFINE_integer("n", 8, "number of queries (rows)")
  flags.DEFINE_integer("seed", None, "draw the queries at random with this seed "
                       "(default: the first n)")
  flags.DEFINE_string("out", "grid.png", "output PNG")
  flags.DEFINE_integer("cell", 192, "side of each image cell in pixels")


def main(argv):
  cli.no_arguments(argv)
  args = flags.FLAGS
  visualize(args.workdir, args.split, args.n, args.out, seed=args.seed,
            layout=Layout(cell=args.cell))
  print(f"wrote {args.out}")


def run() -> None:
  cli.run(main, define_flags, "tigerfg_jax.evaluation.attention_maps")


if __name__ == "__main__":
  run()
