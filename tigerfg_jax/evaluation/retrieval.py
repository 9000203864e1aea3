"""The retrieval evaluator: embed every eval split's catalog and queries, search, score.

Each split folder whose name starts with `eval` is its own benchmark with its own
catalog. The final evaluation writes `WORKDIR/eval/results.json` (a local folder or a
gs:// URL, `tigerfg_jax.runpath`), the embeddings of each split
(`<split>_{item,query}_emb.npy`, rows in split order) and a console table;
a periodic one (`config.evals.retrieval.every`) only returns its metrics for the log.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np

from tigerfg_jax import index
from tigerfg_jax import runpath
from tigerfg_jax.data import pipeline
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.evaluation import embedding, encoders, retrieval_metrics
from tigerfg_jax.models import towers

TOP_K = 10
ITEM_KEYS = ("item_image", "title_tokens", "title_mask")
QUERY_KEYS = ("query_image",)


def embed_split(split: pipeline.Split, params: Any, embed_query, embed_item,
                tokenizer: TitleTokenizer, config: ml_collections.ConfigDict,
                place, *, queries: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
  """float32 (`[num_items, E]`, `[num_queries, E]` or None without `queries`) of
  `split`, rows in split order."""
  batch_size = config.eval.batch_size
  items = pipeline.eval_item_batches(split, tokenizer, config.data, batch_size=batch_size,
                                     max_title_len=config.model.max_title_len)
  item_emb = embedding.embed_batches(
      lambda *x: embed_item(params, *x), items, ITEM_KEYS, split.num_items,
      place=place, desc=f"{split.name} items")
  if not queries:
    return item_emb, None
  query_emb = embedding.embed_batches(
      lambda *x: embed_query(params, *x),
      pipeline.eval_query_batches(split, config.data, batch_size=batch_size), QUERY_KEYS,
      split.num_queries, place=place, desc=f"{split.name} queries")
  return item_emb, query_emb


def score(item_emb: np.ndarray, query_emb: np.ndarray, split: pipeline.Split,
          eval_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Retrieval metrics of `split`'s queries against its catalog (`config.eval.backend`)."""
  searcher = index.build(item_emb, np.arange(split.num_items), eval_config)
  ranked, _ = searcher.search(query_emb, min(TOP_K, split.num_items))
  result = retrieval_metrics.retrieval_metrics(ranked, split.query_positives)
  result["num_items"] = split.num_items
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


class RetrievalEvaluator:
  """Recall@1/5/10 and mAP@10 of every eval split (`config.evals.retrieval`)."""

  def __init__(self, config: ml_collections.ConfigDict, model: towers.TigerFG,
               tokenizer: TitleTokenizer, splits: dict[str, pipeline.Split],
               mesh: jax.sharding.Mesh, workdir: str):
    self.config, self.tokenizer, self.splits = config, tokenizer, splits
    self.out_dir = runpath.path(workdir, "eval")
    self.workdir = workdir
    self.embed_query, self.embed_item = encoders.make_embed_fns(model, mesh)
    self.place = encoders.mesh_placer(mesh)

  def run(self, params: Any, *, final: bool) -> dict[str, dict[str, Any]]:
    """`{split: metrics}`; `final` also writes results.json, the embeddings, a table."""
    results = {}
    for name, split in self.splits.items():
      item_emb, query_emb = embed_split(split, params, self.embed_query, self.embed_item,
                                        self.tokenizer, self.config, self.place)
      results[name] = score(item_emb, query_emb, split, self.config.eval)
      if final and jax.process_index() == 0:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for kind, emb in (("item", item_emb), ("query", query_emb)):
          with (self.out_dir / f"{name}_{kind}_emb.npy").open("wb") as f:
            np.save(f, emb)
    if final and jax.process_index() == 0:
      (self.out_dir / "results.json").write_text(json.dumps(results, indent=2))
      print(f"Retrieval results ({self.workdir}):\n{format_table(results)}", flush=True)
    return results

  @staticmethod
  def scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`{'<split>/<metric>': %}` (R@k, mAP@k; not the counts), for the training log."""
    return {f"{split}/{metric}": value for split, row in results.items()
            for metric, value in row.items() if isinstance(value, float)}
