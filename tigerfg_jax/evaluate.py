"""Retrieval evaluation: embed every eval split's catalog and queries, search, score.

Each split folder whose name starts with `eval` is its own benchmark with its own
catalog. Results go to `WORKDIR/eval/results.json` (DESIGN.md section 8) and a table on
the console; the embeddings are saved next to them with their ids.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from tigerfg_jax import index
from tigerfg_jax import metrics
from tigerfg_jax import sharding
from tigerfg_jax.data import pipeline
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.models import towers

TOP_K = 10


def embed_batches(embed_fn: Callable[..., jax.Array], batches: Iterable[dict[str, np.ndarray]],
                  input_keys: tuple[str, ...], count: int, mesh: jax.sharding.Mesh,
                  desc: str) -> np.ndarray:
  """Runs a jitted `embed_fn(*inputs) -> [B, E]` over padded eval batches.

  Returns float32 `[count, E]` in split row order (rows placed by the batch `index`).
  """
  batch_sharding = sharding.batch_sharding(mesh)
  out = None
  for batch in tqdm(batches, desc=desc, disable=jax.process_index() != 0, leave=False):
    if len(batch["valid"]) % mesh.shape["data"]:
      raise ValueError(f"eval batch of {len(batch['valid'])} rows is not divisible by "
                       f"the {mesh.shape['data']} devices of the 'data' mesh axis")
    inputs = sharding.global_batch_from_host({k: batch[k] for k in input_keys},
                                             batch_sharding)
    emb = np.asarray(jax.device_get(embed_fn(*(inputs[k] for k in input_keys))))
    if out is None:
      out = np.zeros((count, emb.shape[-1]), np.float32)
    valid = batch["valid"]
    out[batch["index"][valid]] = emb[valid]
  if out is None:
    raise ValueError(f"{desc}: the split has no rows to embed")
  return out


def make_embed_fns(model: towers.TigerFG,
                   mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """Jitted `(params, query_image) -> [B, E]` and `(params, image, tokens, mask) -> [B, E]`.

  Params are an argument, not a closure: they are not baked into the compiled program
  (and so one compilation serves every checkpoint of the same shapes).
  """
  repl = sharding.replicated(mesh)

  def embed_query(params, query_image):
    return model.apply({"params": params}, query_image, method=towers.TigerFG.embed_query)

  def embed_item(params, item_image, title_tokens, title_mask):
    emb, _ = model.apply({"params": params}, item_image, title_tokens, title_mask,
                         method=towers.TigerFG.embed_item)
    return emb

  return jax.jit(embed_query, out_shardings=repl), jax.jit(embed_item, out_shardings=repl)


def evaluate_split(split: pipeline.Split, embed_query: Callable, embed_item: Callable,
                   tokenizer: TitleTokenizer, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh, out_dir: str) -> dict[str, Any]:
  """Metrics of one split; saves its embeddings as `out_dir/<split>_*.npy`."""
  batch_size = config.eval.batch_size
  item_emb = embed_batches(
      embed_item, pipeline.eval_item_batches(split, tokenizer, config.data,
                                             batch_size=batch_size,
                                             max_title_len=config.model.max_title_len),
      ("item_image", "title_tokens", "title_mask"), split.num_items, mesh,
      f"{split.name} items")
  query_emb = embed_batches(
      embed_query, pipeline.eval_query_batches(split, config.data, batch_size=batch_size),
      ("query_image",), split.num_queries, mesh, f"{split.name} queries")
  searcher = index.build(item_emb, np.arange(split.num_items), config.eval)
  ranked, _ = searcher.search(query_emb, min(TOP_K, split.num_items))
  result = metrics.retrieval_metrics(ranked, split.query_positives)
  result["num_items"] = split.num_items
  if jax.process_index() == 0:
    np.save(os.path.join(out_dir, f"{split.name}_item_emb.npy"), item_emb)
    np.save(os.path.join(out_dir, f"{split.name}_query_emb.npy"), query_emb)
  return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
  columns = ("R@1", "R@5", "R@10", "mAP@10", "num_queries", "num_items")
  lines = ["| split | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for name, row in results.items():
    cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c])
             for c in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def evaluate_all(model: towers.TigerFG, params: Any, tokenizer: TitleTokenizer,
                 splits: dict[str, pipeline.Split], config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh, workdir: str) -> dict[str, dict[str, Any]]:
  """Evaluates each split; writes `workdir/eval/results.json`, prints a table."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  embed_query, embed_item = make_embed_fns(model, mesh)
  embed_query = functools.partial(embed_query, params)
  embed_item = functools.partial(embed_item, params)
  results = {}
  for name, split in splits.items():
    results[name] = evaluate_split(split, embed_query, embed_item, tokenizer, config,
                                   mesh, out_dir)
  if jax.process_index() == 0:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    print(f"Retrieval results ({workdir}):\n{format_table(results)}", flush=True)
  return results
