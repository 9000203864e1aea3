r"""How much the title-only attention loses against perfect grounding.

  python -m tigerfg_jax.box_oracle --workdir=DIR [--splits=eval_cluttered,eval_normal]

Evaluates a trained run's latest checkpoint on each eval split twice: as deployed (the
text-guided pooling reads every patch) and with each item's pooling restricted to the
patches its ground-truth box covers (the privileged teacher's `region_mask`). Same
features, perfect grounding: the gap between the two rows is what the attention loses.
An item's box is the box of a query whose first positive it is; an item without one
reads every patch. Search is exact (NumPy inner products), so the numbers do not depend
on an index backend.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from tigerfg_jax import metrics
from tigerfg_jax import train
from tigerfg_jax.data import catalog_root
from tigerfg_jax.data import pipeline
from tigerfg_jax.data import spatial
from tigerfg_jax.evaluate import TOP_K
from tigerfg_jax.models import towers


def item_region_masks(split: pipeline.Split, grid: int) -> np.ndarray:
  """bool `[num_items, grid * grid]`: the patches each item's box covers (all without)."""
  boxes = np.zeros((split.num_items, 4), np.float32)
  has_box = np.zeros(split.num_items, bool)
  for positives, box in zip(split.query_positives, split.query_boxes):
    row = positives[0]
    if box is not None and not has_box[row]:
      boxes[row] = spatial.normalize_box(box, *split.item_sizes[row])
      has_box[row] = True
  return spatial.patch_targets(boxes, has_box, grid) > 0


def _embed(fn, arrays: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """float32 `[M, E]`: `fn(*batch)` over row chunks of `arrays`."""
  count = len(arrays[0])
  return np.concatenate([np.asarray(fn(*(a[i:i + batch_size] for a in arrays)))
                         for i in range(0, count, batch_size)])


def split_recalls(model: towers.TigerFG, params: Any, split: pipeline.Split,
                  titles: tuple[np.ndarray, np.ndarray], config) -> dict[str, dict]:
  """`{'deployed': metrics, 'box': metrics}` of one split (metrics.retrieval_metrics)."""
  item_size, query_size = config.data.item_image_size, config.data.query_image_size
  batch_size = config.eval.batch_size
  items = np.stack([pipeline.eval_image(split.items[r]["image"], item_size)
                    for r in range(split.num_items)])
  queries = np.stack([pipeline.eval_image(split.queries[r]["image"], query_size)
                      for r in range(split.num_queries)])
  boxed = item_region_masks(split, item_size // config.model.patch_size)

  embed_query = jax.jit(lambda x: model.apply({"params": params}, x,
                                              method=towers.TigerFG.embed_query))
  embed_item = jax.jit(lambda x, t, m, r: model.apply(
      {"params": params}, x, t, m, r, method=towers.TigerFG.embed_item)[0])
  query_emb = _embed(embed_query, [queries], batch_size)
  k = min(TOP_K, split.num_items)
  results = {}
  for name, region in (("deployed", np.ones_like(boxed)), ("box", boxed)):
    item_emb = _embed(embed_item, [items, *titles, region], batch_size)
    ranked = np.argsort(-(query_emb @ item_emb.T), axis=1, kind="stable")[:, :k]
    results[name] = metrics.retrieval_metrics(ranked, split.query_positives)
  return results


def box_oracle(workdir: str, splits: Sequence[str]) -> dict[str, dict[str, dict]]:
  """`{split: {'deployed': metrics, 'box': metrics}}` for a trained run's workdir."""
  config = train.load_config(workdir)
  if config.model.mode != "tiger":
    raise ValueError(f"{workdir}: model.mode={config.model.mode!r}; the box oracle "
                     "restricts the text-guided pooling of a 'tiger' model")
  model, params, tokenizer = train.load_trained(workdir)
  root = catalog_root(config.data, workdir)
  results = {}
  for name in splits:
    split = pipeline.load_split(root, name, cache_dir=os.path.join(root, ".cache"),
                                skip_bad=config.data.skip_bad)
    titles = tokenizer.encode(split.titles, config.model.max_title_len)
    results[name] = split_recalls(model, params, split, titles, config)
  return results


def format_results(results: dict[str, dict[str, dict]]) -> str:
  lines = ["| split | pooling reads | R@1 | R@5 | R@10 |", "|---|---|---|---|---|"]
  for split, rows in results.items():
    for name, row in rows.items():
      reads = "every patch (deployed)" if name == "deployed" else "the true box only"
      lines.append(f"| {split} | {reads} | {row['R@1']:.2f} | {row['R@5']:.2f} | "
                   f"{row['R@10']:.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  print(format_results(box_oracle(FLAGS.workdir, FLAGS.splits)))


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "a trained run's workdir", required=True)
  flags.DEFINE_list("splits", ["eval_cluttered", "eval_normal"], "eval splits")
  FLAGS = flags.FLAGS
  app.run(main)
