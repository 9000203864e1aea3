"""The attention figure: overlay colours, box outline, layout, and a real trained run."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.evaluation import attention_maps
from tigerfg_jax.models import towers

ALPHA = 0.55  # overlay's default heat weight
GRAY = 128


@pytest.fixture(name="trained_run")
def trained_run_fixture(micro_run):
  """The workdir of the shared 2-step micro run."""
  return micro_run[0]


def _gray(size: int) -> np.ndarray:
  return np.full((size, size, 3), GRAY, np.uint8)


def _blend(colour) -> np.ndarray:
  """Closed form of a heat colour blended over the gray image."""
  return np.round((1 - ALPHA) * GRAY + ALPHA * np.asarray(colour, np.float64))


def test_upsample_grid_gives_each_patch_its_pixels():
  grid = np.arange(12.0).reshape(3, 4)
  up = attention_maps.upsample_grid(grid, 9, 8)
  for i in range(3):
    for j in range(4):
      np.testing.assert_array_equal(up[3 * i:3 * i + 3, 2 * j:2 * j + 2], grid[i, j])


def test_overlay_high_attention_is_red_low_is_blue():
  attention = np.full((4, 4), 0.02)
  attention[1, 2] = 0.5      # the peak patch
  attention[0, 0] = 0.3
  attention[3, 0] = 0.001    # the lowest patch
  out = attention_maps.overlay(_gray(32), attention)
  assert out.shape == (32, 32, 3) and out.dtype == np.uint8
  peak = out[8 + 4, 16 + 4]   # centre of patch (1, 2); patches are 8 px
  lowest = out[24 + 4, 0 + 4]
  np.testing.assert_array_equal(peak, _blend((255, 0, 0)))
  np.testing.assert_array_equal(lowest, _blend((0, 0, 255)))
  redness = out[..., 0].astype(int) - out[..., 2].astype(int)
  assert redness[12, 20] > redness[4, 4] > redness[28, 4]


def test_overlay_follows_the_map():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  a = np.random.default_rng(1).random((4, 4))
  b = np.random.default_rng(2).random((4, 4))
  assert np.any(attention_maps.overlay(image, a) != attention_maps.overlay(image, b))
  # Min-max scaling: an affine change of the map leaves the picture unchanged.
  np.testing.assert_array_equal(attention_maps.overlay(image, a),
                                attention_maps.overlay(image, 3 * a + 1))
  # Redness per patch ranks like the attention on a flat image.
  out = attention_maps.overlay(_gray(32), a).astype(int)
  redness = (out[4::8, 4::8, 0] - out[4::8, 4::8, 2]).ravel()
  order = np.argsort(a.ravel())
  assert np.all(np.diff(redness[order]) >= 0)
  assert redness[order[-1]] > redness[order[0]]


def test_figure_size_box_outline_and_caption():
  layout = attention_maps.Layout(cell=64, pad=8, line_height=16, text_lines=3)
  title = "red round handbag with white stripes " * 6
  rows = [attention_maps.FigureRow(query=_gray(20), item=_gray(32), attention=np.ones((4, 4)),
                              box=[8, 4, 24, 20], title=title)] * 2
  figure = np.asarray(attention_maps.render_figure(rows, layout))
  # Width: 3 cells + 4 pads; height: header (pad + line) + 2 x (pad + cell + 3 lines) + pad.
  assert figure.shape == (24 + 2 * (8 + 64 + 48) + 8, 3 * 64 + 4 * 8, 3)
  # Item cell of row 1 (column 1) starts at x = 8 + 72, y = 24 + 120 + 8; the 32 px
  # item is shown at 64 px, so the box [8, 4, 24, 20] covers pixels 16..47 x 8..39.
  x, y = 80, 152
  for column_x in (x, x + 72):  # the item cell and the attention cell
    cell = figure[y:y + 64, column_x:column_x + 64]
    outline = np.all(cell == attention_maps.BOX_COLOUR, axis=-1)
    assert outline[8, 16] and outline[39, 47] and outline[8, 30] and outline[25, 16]
    assert outline[39, 30] and outline[25, 47]
    assert not outline[24, 31] and not outline[4, 16] and not outline[8, 52]
    assert outline.sum() > 0 and not outline[:6].any() and not outline[:, 50:].any()
  # The query cell has no box.
  assert not np.all(figure[y:y + 64, 8:72] == attention_maps.BOX_COLOUR, axis=-1).any()
  # The caption under each row has text, and the long title stays inside the margins.
  for row in range(2):
    band = figure[24 + row * 120 + 8 + 64:24 + (row + 1) * 120]
    assert (band[:, 8:-8] < 100).any()
    assert (band[:, -8:] == 255).all()


def test_pick_queries():
  assert attention_maps.pick_queries(10, 4, None) == [0, 1, 2, 3]
  assert attention_maps.pick_queries(3, 8, None) == [0, 1, 2]
  drawn = attention_maps.pick_queries(50, 6, seed=3)
  assert drawn == attention_maps.pick_queries(50, 6, seed=3)
  assert len(set(drawn)) == 6 and all(0 <= q < 50 for q in drawn)
  assert drawn != attention_maps.pick_queries(50, 6, seed=4)


def test_figure_of_a_trained_run(trained_run, tmp_path):
  out = str(tmp_path / "grid.png")
  layout = attention_maps.Layout(cell=96)
  rows = attention_maps.visualize(trained_run, "eval_cluttered", 3, out, layout=layout)
  with Image.open(out) as png:
    assert png.format == "PNG"
    assert png.size == (3 * 96 + 4 * layout.pad,
                        layout.pad + layout.line_height
                        + 3 * (layout.pad + 96 + layout.text_lines * layout.line_height)
                        + layout.pad)

  _, model, params, tokenizer = workdir_lib.load_trained(trained_run)
  config = workdir_lib.load_config(trained_run)
  # The maps match the full forward pass's attention (mean over heads) on the same items.
  size = config.data.item_image_size
  items = np.stack([np.asarray(Image.fromarray(r.item).resize((size, size),
                                                              Image.Resampling.BILINEAR))
                    for r in rows])
  tokens, mask = tokenizer.encode([r.title for r in rows], config.model.max_title_len)
  forward = model.apply({"params": params}, {"query_image": items, "item_image": items,
                                             "title_tokens": tokens, "title_mask": mask})
  expected = np.asarray(forward["attention"]).mean(axis=1).reshape(3, 4, 4)
  for row, want in zip(rows, expected):
    assert row.attention.shape == (4, 4)
    np.testing.assert_allclose(row.attention.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(row.attention, want, rtol=1e-4, atol=1e-6)
    assert row.box is not None and row.title
  assert isinstance(model, towers.TigerFG)
  with pytest.raises(ValueError, match="no_such_split"):
    attention_maps.figure_rows(trained_run, "no_such_split", 2)
