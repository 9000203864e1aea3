"""The box oracle: region masks and crops from the queries' boxes, and its three rows
on a real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tigerfg_jax import config_lib, sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import augment, pipeline, spatial
from tigerfg_jax.evaluation import box_oracle
from tigerfg_jax.models import factory, towers, zoom


@pytest.fixture(name="trained_run")
def trained_run_fixture(micro_run):
  """(workdir, catalog root) of the shared 2-step micro run."""
  return micro_run


def test_item_region_masks_cover_each_box(trained_run):
  _, root = trained_run
  split = pipeline.load_split(root, "eval_cluttered", cache_dir=f"{root}/.cache")
  grid, side = 4, 32 // 4
  masks = box_oracle.item_region_masks(split, grid).reshape(-1, grid, grid)
  for q, (x0, y0, x1, y1) in enumerate(split.query_boxes):
    row = split.query_positives[q][0]
    # Patch (i, j) spans pixels [j*side, (j+1)*side) x [i*side, (i+1)*side).
    want = np.zeros((grid, grid), bool)
    for i in range(grid):
      for j in range(grid):
        want[i, j] = (x0 < (j + 1) * side and x1 > j * side
                      and y0 < (i + 1) * side and y1 > i * side)
    np.testing.assert_array_equal(masks[row], want, err_msg=f"item row {row}")
    assert 0 < want.sum() < grid * grid


def test_crop_regions_are_the_teachers_context_squares(trained_run):
  _, root = trained_run
  split = pipeline.load_split(root, "eval_cluttered", cache_dir=f"{root}/.cache")
  regions = box_oracle.item_crop_regions(split)
  with_box = set()
  for q, box in enumerate(split.query_boxes):
    row = split.query_positives[q][0]
    if box is None or row in with_box:
      continue
    with_box.add(row)
    normalised = spatial.normalize_box(box, *split.item_sizes[row])
    # The item images are square (the model reads them squashed to S x S).
    np.testing.assert_allclose(regions[row], augment.context_box(normalised, 1.0, 1.0),
                               atol=1e-6, err_msg=f"item row {row}")
  assert with_box
  for row in set(range(split.num_items)) - with_box:
    np.testing.assert_array_equal(regions[row], [0, 0, 1, 1])


def test_both_pooling_rows_match_a_direct_forward_pass(trained_run):
  workdir, root = trained_run
  results = box_oracle.box_oracle(workdir, ["eval_cluttered"])["eval_cluttered"]
  # The deployed row is the run's own evaluation (ScaNN there, exact search here).
  with open(f"{workdir}/eval/results.json") as f:
    assert results["deployed"]["R@1"] == json.load(f)["eval_cluttered"]["R@1"]

  # The box row from model.apply with masks built here, R@1 counted with NumPy.
  _, model, params, tokenizer = workdir_lib.load_trained(workdir)
  split = pipeline.load_split(root, "eval_cluttered", cache_dir=f"{root}/.cache")
  items = np.stack([pipeline.eval_image(split.items[r]["image"], 32)
                    for r in range(split.num_items)])
  queries = np.stack([pipeline.eval_image(split.queries[r]["image"], 32)
                      for r in range(split.num_queries)])
  max_title_len = workdir_lib.load_config(workdir).model.max_title_len
  tokens, mask = tokenizer.encode(split.titles, max_title_len)
  region = box_oracle.item_region_masks(split, 4)
  item_emb, aux = model.apply({"params": params}, items, tokens, mask, region,
                              method=towers.TigerFG.embed_item)
  attention = np.asarray(aux["attention"])
  assert np.all(attention[~np.broadcast_to(region[:, None], attention.shape)] == 0)
  query_emb = model.apply({"params": params}, queries, method=towers.TigerFG.embed_query)
  best = np.argmax(np.asarray(query_emb) @ np.asarray(item_emb).T, axis=1)
  want = 100 * np.mean([best[q] in split.query_positives[q] for q in range(len(best))])
  assert results["box"]["R@1"] == pytest.approx(want)


def test_crop_row_embeds_each_items_context_crop_in_one_look(trained_run):
  workdir, root = trained_run
  config, model, params, tokenizer = workdir_lib.load_trained(workdir)
  split = pipeline.load_split(root, "eval_cluttered", cache_dir=f"{root}/.cache")
  evaluator = box_oracle.BoxOracleEvaluator(config, model, tokenizer, {},
                                            sharding.make_mesh(config.mesh), workdir)
  got = evaluator.item_embeddings(params, split)["crop"]

  # Each item's context crop (zoom.crop_resize, tested in test_zoom.py), rounded to
  # pixels, embedded by the same weights without the zoom the distill run has.
  items = np.stack([pipeline.eval_image(split.items[r]["image"], 32)
                    for r in range(split.num_items)])
  tokens, mask = tokenizer.encode(split.titles, config.model.max_title_len)
  assert config.model.zoom_threshold > 0
  config.model.zoom_threshold = 0.0
  one_look = factory.build_model(config, tokenizer.vocab_size)
  crops = np.clip(np.round(np.asarray(
      zoom.crop_resize(items, box_oracle.item_crop_regions(split)))), 0, 255)
  want, _ = one_look.apply({"params": params}, crops.astype(np.uint8), tokens, mask,
                           method=towers.TigerFG.embed_item)
  # atol: a pixel that rounds the other way under jit moves an embedding by ~1e-4.
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-3)
  # The zoom matters: the deployed (two-look) model gives other embeddings of the crops.
  zoomed, _ = model.apply({"params": params}, crops.astype(np.uint8), tokens, mask,
                          method=towers.TigerFG.embed_item)
  assert np.abs(np.asarray(zoomed) - np.asarray(want)).max() > 1e-2


def test_refuses_a_clip_style_run(tmp_path):
  config = config_lib.experiment_config("clip_style", "micro")
  tmp_path.joinpath("config.json").write_text(config.to_json())
  with pytest.raises(ValueError, match="model.mode='clip_style'"):
    box_oracle.box_oracle(str(tmp_path), ["eval_cluttered"])
