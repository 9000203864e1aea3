r"""How much the title-only attention loses against perfect grounding.

  python -m tigerfg_jax.evaluation.box_oracle --workdir=DIR \
      [--splits=eval_cluttered,eval_normal]

Evaluates a trained run's latest checkpoint on each eval split three times: as
deployed (the text-guided pooling reads every patch); with each item's pooling
restricted to the patches its ground-truth box covers (`box`: the privileged teacher's
`region_mask`; same features, perfect grounding: the gap to `deployed` is what the
attention loses); and with each item embedded, in one look, from the square context
crop around its box (`crop`: what the privileged teacher sees, and what a perfect zoom
or detector would give these weights: the gap to `box` is what the ViT loses by
reading the product among its neighbours). An item's box is the box of a query whose
first positive it is; an item without one reads every patch of its whole image. Search
is exact (NumPy inner products), so the numbers do not depend on an index backend. As a
plug-in evaluator (`config.evals.box_oracle`) it runs during training too and writes
`eval/box_oracle.json` at the end.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from tigerfg_jax import cli
from tigerfg_jax import runpath

from tigerfg_jax import sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import pipeline
from tigerfg_jax.data import spatial
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.evaluation import embedding, encoders, retrieval, retrieval_metrics
from tigerfg_jax.models import towers, zoom

RESULTS_FILE = "box_oracle.json"
ROW_LABELS = {"deployed": "the whole image (deployed)",
              "box": "the whole image, pooling the true box only",
              "crop": "the true box's context crop, one look"}


def item_boxes(split: pipeline.Split) -> tuple[np.ndarray, np.ndarray]:
  """(float32 `[num_items, 4]` normalised boxes, bool `[num_items]` has a box): each
  item's box is its first query's (zeros without one)."""
  boxes = np.zeros((split.num_items, 4), np.float32)
  has_box = np.zeros(split.num_items, bool)
  for positives, box in zip(split.query_positives, split.query_boxes):
    row = positives[0]
    if box is not None and not has_box[row]:
      boxes[row] = spatial.normalize_box(box, *split.item_sizes[row])
      has_box[row] = True
  return boxes, has_box


def item_region_masks(split: pipeline.Split, grid: int) -> np.ndarray:
  """bool `[num_items, grid * grid]`: the patches each item's box covers (all without)."""
  return spatial.patch_targets(*item_boxes(split), grid) > 0


def item_crop_regions(split: pipeline.Split) -> np.ndarray:
  """float32 `[num_items, 4]`: the square context of each item's box in its (square)
  item image, `zoom.context_square` with the teacher's margin; the whole image
  (0, 0, 1, 1) for an item without a box."""
  boxes, has_box = item_boxes(split)
  squares = np.asarray(zoom.context_square(jnp.asarray(boxes), zoom.CONTEXT_MARGIN))
  return np.where(has_box[:, None], squares, np.float32(zoom.WHOLE_IMAGE))


def _with_region(batches, masks: np.ndarray):
  """The item batches with `region_mask` bool `[B, N]` (padding rows: all True)."""
  for batch in batches:
    region = masks[np.maximum(batch["index"], 0)] | ~batch["valid"][:, None]
    yield dict(batch, region_mask=region)


@jax.jit
def _crop_images(images: jax.Array, regions: jax.Array) -> jax.Array:
  """uint8 `[B, S, S, 3]` -> uint8: each image's `regions` row resized to S x S."""
  return jnp.clip(jnp.round(zoom.crop_resize(images, regions)), 0, 255).astype(jnp.uint8)


def _with_crops(batches, regions: np.ndarray):
  """The item batches with each row's `item_image` its crop (padding rows: whole)."""
  for batch in batches:
    crop = np.where(batch["valid"][:, None], regions[np.maximum(batch["index"], 0)],
                    np.float32(zoom.WHOLE_IMAGE))
    yield dict(batch, item_image=np.asarray(_crop_images(batch["item_image"], crop)))


def _one_look(model: towers.TigerFG) -> towers.TigerFG:
  """`model` without the attention zoom (same parameters): the crop row's encoder."""
  config = ml_collections.ConfigDict(model.config.as_configdict())
  config.zoom_threshold = 0.0
  return model.clone(config=ml_collections.FrozenConfigDict(config))


def _check_mode(config: ml_collections.ConfigDict) -> None:
  if config.model.mode != "tiger":
    raise ValueError(f"model.mode={config.model.mode!r}: the box oracle restricts the "
                     "text-guided pooling of a 'tiger' model (set "
                     "--config.evals.box_oracle.at_end=false)")


class BoxOracleEvaluator:
  """`{split: {'deployed' | 'box' | 'crop': metrics}}` (`config.evals.box_oracle`)."""

  def __init__(self, config: ml_collections.ConfigDict, model: towers.TigerFG,
               tokenizer: TitleTokenizer, splits: dict[str, pipeline.Split],
               mesh: jax.sharding.Mesh, workdir: str):
    _check_mode(config)
    self.config, self.tokenizer, self.splits = config, tokenizer, splits
    self.out_path = runpath.path(workdir, workdir_lib.EVAL_DIR, RESULTS_FILE)
    self.embed_query, self.embed_item = encoders.make_embed_fns(model, mesh)
    _, self.embed_crop = encoders.make_embed_fns(_one_look(model), mesh)
    self.place = encoders.mesh_placer(mesh)

  def item_embeddings(self, params: Any, split: pipeline.Split) -> dict[str, np.ndarray]:
    """`{'deployed' | 'box' | 'crop': float32 [num_items, E]}`, rows in split order."""
    config = self.config
    grid = config.data.item_image_size // config.model.patch_size
    items = pipeline.eval_item_batches(split, self.tokenizer, config.data,
                                       batch_size=config.eval.batch_size,
                                       max_title_len=config.model.max_title_len)
    boxed = item_region_masks(split, grid)
    rows = {
        name: embedding.embed_batches(
            lambda *x: self.embed_item(params, *x), _with_region(items, region),
            (*retrieval.ITEM_KEYS, "region_mask"), split.num_items, place=self.place)
        for name, region in (("deployed", np.ones_like(boxed)), ("box", boxed))}
    rows["crop"] = embedding.embed_batches(
        lambda *x: self.embed_crop(params, *x), _with_crops(items, item_crop_regions(split)),
        retrieval.ITEM_KEYS, split.num_items, place=self.place)
    return rows

  def split_recalls(self, params: Any, split: pipeline.Split) -> dict[str, dict]:
    query_emb = embedding.embed_batches(
        lambda x: self.embed_query(params, x),
        pipeline.eval_query_batches(split, self.config.data,
                                    batch_size=self.config.eval.batch_size),
        retrieval.QUERY_KEYS, split.num_queries, place=self.place)
    k = min(retrieval.TOP_K, split.num_items)
    results = {}
    for name, item_emb in self.item_embeddings(params, split).items():
      ranked = np.argsort(-(query_emb @ item_emb.T), axis=1, kind="stable")[:, :k]
      results[name] = retrieval_metrics.retrieval_metrics(ranked, split.query_positives)
    return results

  def run(self, params: Any, *, final: bool) -> dict[str, dict[str, dict]]:
    results = {name: self.split_recalls(params, split) for name, split in self.splits.items()}
    if final and jax.process_index() == 0:
      self.out_path.parent.mkdir(parents=True, exist_ok=True)
      self.out_path.write_text(json.dumps(results, indent=2))
    return results

  @staticmethod
  def scalars(results: dict[str, dict[str, dict]]) -> dict[str, float]:
    """`{'<split>/<deployed|box|crop>/R@k': %}` for the training log."""
    return {f"{split}/{row}/{metric}": value for split, rows in results.items()
            for row, values in rows.items() for metric, value in values.items()
            if isinstance(value, float)}


def box_oracle(workdir: str, splits: Sequence[str]) -> dict[str, dict[str, dict]]:
  """`{split: {'deployed' | 'box' | 'crop': metrics}}` for a trained run's workdir."""
  _check_mode(workdir_lib.load_config(workdir))
  config, model, params, tokenizer = workdir_lib.load_trained(workdir)
  loaded = {name: workdir_lib.load_split(config, workdir, name) for name in splits}
  evaluator = BoxOracleEvaluator(config, model, tokenizer, loaded,
                                 sharding.make_mesh(config.mesh), workdir)
  return evaluator.run(params, final=False)


def format_results(results: dict[str, dict[str, dict]]) -> str:
  lines = ["| split | item read from | R@1 | R@5 | R@10 |", "|---|---|---|---|---|"]
  for split, rows in results.items():
    for name, row in rows.items():
      lines.append(f"| {split} | {ROW_LABELS[name]} | {row['R@1']:.2f} | {row['R@5']:.2f} | "
                   f"{row['R@10']:.2f} |")
  return "\n".join(lines)


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "a trained run's workdir", required=True)
  flags.DEFINE_list("splits", ["eval_cluttered", "eval_normal"], "eval splits")


def main(argv):
  cli.no_arguments(argv)
  print(format_results(box_oracle(flags.FLAGS.workdir, flags.FLAGS.splits)))


def run() -> None:
  cli.run(main, define_flags, "tigerfg_jax.evaluation.box_oracle")


if __name__ == "__main__":
  run()
