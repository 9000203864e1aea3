"""The retrieval evaluator: embed every eval split's catalog and queries, search, score.

Each split folder whose name starts with `eval` is its own benchmark with its own
catalog. Image queries give the row `<split>` (not in the text_query stage, which
trains no image queries); a model with a text query tower also answers the split's
text queries (`text_queries.jsonl`) from the same item embeddings: row `<split>/text`
(R@1, R@10, R@50, NDCG@10, mAP@10).

The final evaluation writes `WORKDIR/eval/results.json` (a local folder or a gs:// URL,
`tigerfg_jax.runpath`), the embeddings of each split
(`<split>_{item,query,text_query}_emb.npy`, rows in split order) and a console table;
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
# Text queries: ranked this deep, scored at these depths.
TEXT_TOP_K = 50
TEXT_KEYS = ("text_tokens", "text_mask")
TEXT_METRICS = dict(ks=(1, 10, 50), map_k=10, ndcg_k=10)
# The suffix of a split's text-query row in results.json.
TEXT_ROW = "/text"


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


def embed_text_queries(split: pipeline.Split, params: Any, embed_text,
                       tokenizer: TitleTokenizer, config: ml_collections.ConfigDict,
                       place) -> np.ndarray:
  """float32 `[num_text_queries, E']` of `split`'s text queries, rows in file order."""
  batches = pipeline.eval_text_query_batches(split, tokenizer,
                                             batch_size=config.eval.batch_size,
                                             max_query_len=config.model.max_query_len)
  return embedding.embed_batches(lambda *x: embed_text(params, *x), batches, TEXT_KEYS,
                                 len(split.text_queries), place=place,
                                 desc=f"{split.name} text queries")


def score(item_emb: np.ndarray, query_emb: np.ndarray, positives: list[list[int]],
          eval_config: ml_collections.ConfigDict, top_k: int = TOP_K,
          **metrics: Any) -> dict[str, Any]:
  """Retrieval metrics of queries with `positives` (item rows) against the catalog
  `item_emb` (`config.eval.backend`); `metrics`: `retrieval_metrics`' ks/map_k/ndcg_k."""
  num_items = len(item_emb)
  searcher = index.build(item_emb, np.arange(num_items), eval_config)
  ranked, _ = searcher.search(query_emb, min(top_k, num_items))
  result = retrieval_metrics.retrieval_metrics(ranked, positives, **metrics)
  result["num_items"] = num_items
  return result


def format_table(results: dict[str, dict[str, Any]]) -> str:
  """A markdown table of the rows; a metric a row does not have is left blank."""
  columns = [c for c in ("R@1", "R@5", "R@10", "R@50", "NDCG@10", "mAP@10",
                         "num_queries", "num_items")
             if any(c in row for row in results.values())]
  lines = ["| split | " + " | ".join(columns) + " |",
           "|---" * (len(columns) + 1) + "|"]
  for name, row in results.items():
    cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
             for c in columns]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


class RetrievalEvaluator:
  """Every eval split's image- and text-query metrics (`config.evals.retrieval`)."""

  def __init__(self, config: ml_collections.ConfigDict, model: towers.TigerFG,
               tokenizer: TitleTokenizer, splits: dict[str, pipeline.Split],
               mesh: jax.sharding.Mesh, workdir: str):
    self.config, self.tokenizer, self.splits = config, tokenizer, splits
    self.out_dir = runpath.path(workdir, "eval")
    self.workdir = workdir
    self.embed_query, self.embed_item = encoders.make_embed_fns(model, mesh)
    self.embed_text = (encoders.make_text_embed_fn(model, mesh)
                       if config.model.text_query_encoder != "none" else None)
    self.image_queries = config.stage != "text_query"
    self.place = encoders.mesh_placer(mesh)

  def run(self, params: Any, *, final: bool) -> dict[str, dict[str, Any]]:
    """`{row: metrics}`; `final` also writes results.json, the embeddings, a table."""
    results, saved = {}, {}
    for name, split in self.splits.items():
      item_emb, query_emb = embed_split(split, params, self.embed_query, self.embed_item,
                                        self.tokenizer, self.config, self.place,
                                        queries=self.image_queries)
      saved[f"{name}_item_emb"] = item_emb
      if self.image_queries:
        results[name] = score(item_emb, query_emb, split.query_positives, self.config.eval)
        saved[f"{name}_query_emb"] = query_emb
      if self.embed_text is not None and split.text_queries:
        text_emb = embed_text_queries(split, params, self.embed_text, self.tokenizer,
                                      self.config, self.place)
        results[name + TEXT_ROW] = score(item_emb, text_emb, split.text_query_positives,
                                         self.config.eval, TEXT_TOP_K, **TEXT_METRICS)
        saved[f"{name}_text_query_emb"] = text_emb
    if final and jax.process_index() == 0:
      self.out_dir.mkdir(parents=True, exist_ok=True)
      for file_name, emb in saved.items():
        with (self.out_dir / f"{file_name}.npy").open("wb") as f:
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
