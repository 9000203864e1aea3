"""Retrieval metrics with several positives per query: Recall@k, mAP@k and NDCG@k.

Inputs are rankings of catalog rows (row indices, best first), one per query, and the
set of positive rows of each query. All metrics are percentages in [0, 100].

  R@k   = 100 * mean over queries of [any positive in the first k rows].
  AP@k  = (1 / min(|P|, k)) * sum_{r=1..k} P@r * rel_r, where rel_r = 1 if the row at
          rank r is a positive and P@r = (positives in the first r rows) / r. The
          normaliser min(|P|, k) makes a ranking with all of its first k rows positive
          score 1 even when a query has more than k positives.
  mAP@k = 100 * mean over queries of AP@k.
  NDCG@k = 100 * mean over queries of DCG@k / IDCG@k with binary relevance:
          DCG@k = sum_{r=1..k} rel_r / log2(r + 1), and IDCG@k the DCG@k of a ranking
          that puts min(|P|, k) positives first.

Ties are whatever order the ranking gives: the metrics never look at scores. Use
`rank_by_score` to rank a score matrix with a deterministic tie-break. A ranking
shorter than k (a catalog smaller than k) is scored on the rows it has; a row of -1
(an index's "no item") is never a positive. With no queries every metric is 0.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def rank_by_score(scores: np.ndarray, k: int) -> np.ndarray:
  """Rows of the k highest scores per query `[Q, k]` int64, ties by lower row first.

  Args:
    scores: `[Q, M]` float similarity of each query to each catalog row.
    k: ranking length, clipped to M.
  """
  scores = np.asarray(scores)
  if scores.ndim != 2 or scores.dtype.kind != "f":
    raise ValueError(f"scores: expected a 2-D float array [Q, M], got {scores.dtype} "
                     f"{scores.shape}")
  if np.isnan(scores).any():
    raise ValueError("scores: contains NaN")
  # A stable sort of the negated scores keeps equal scores in ascending row order.
  return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def _relevance(rows: np.ndarray, positives: Sequence[Iterable[int]]) -> tuple[
    np.ndarray, np.ndarray]:
  """Relevance `[Q, K]` bool of each ranked row and the positive counts `[Q]`."""
  relevant = np.zeros(rows.shape, bool)
  counts = np.zeros(len(rows), np.int64)
  for query, (ranking, query_positives) in enumerate(zip(rows, positives)):
    query_positives = np.unique(np.asarray(list(query_positives), np.int64))
    if not len(query_positives):
      raise ValueError(f"positives[{query}]: empty; every query needs a positive row")
    real = ranking[ranking >= 0]
    if len(np.unique(real)) != len(real):
      raise ValueError(f"ranked_item_rows[{query}]: a row appears twice: {ranking}")
    relevant[query] = np.isin(ranking, query_positives)
    counts[query] = len(query_positives)
  return relevant, counts


def _ndcg(relevant: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """float64 `[Q]` NDCG of binary relevance `[Q, k]` with `counts` positives each."""
  discounts = 1.0 / np.log2(np.arange(2, relevant.shape[1] + 2))
  dcg = (relevant * discounts).sum(axis=1)
  ideal = np.cumsum(discounts)[np.minimum(counts, relevant.shape[1]) - 1]
  return dcg / ideal


def retrieval_metrics(ranked_item_rows: np.ndarray,
                      positives: Sequence[Iterable[int]],
                      ks: Sequence[int] = (1, 5, 10),
                      map_k: int = 10,
                      ndcg_k: int | None = None) -> dict[str, float | int]:
  """Recall@k for each k in `ks`, mAP@`map_k` and NDCG@`ndcg_k` (module docstring).

  Args:
    ranked_item_rows: `[Q, K]` int catalog rows per query, best first (-1 = none).
    positives: Q collections of positive catalog rows (sets or lists).
    ks: the k of each `R@k`.
    map_k: the k of `mAP@k`.
    ndcg_k: the k of `NDCG@k` (None: not computed).

  Returns:
    `{'R@1': %, 'R@5': %, 'R@10': %, 'mAP@10': %, 'num_queries': Q}` (keys follow
    `ks` and `map_k`; with `ndcg_k` also `'NDCG@<ndcg_k>'`).
  """
  rows = np.asarray(ranked_item_rows)
  if rows.ndim != 2 or rows.dtype.kind not in "iu":
    raise ValueError(f"ranked_item_rows: expected a 2-D integer array [Q, K], got "
                     f"{rows.dtype} {rows.shape}")
  if len(positives) != len(rows):
    raise ValueError(f"positives: expected one collection per query ({len(rows)}), "
                     f"got {len(positives)}")
  if any(k < 1 for k in (*ks, map_k, ndcg_k or 1)):
    raise ValueError(f"ks={tuple(ks)}, map_k={map_k}, ndcg_k={ndcg_k}: every k must "
                     "be >= 1")
  relevant, counts = _relevance(rows, positives)
  results: dict[str, float | int] = {}
  for k in ks:
    hits = relevant[:, :k].any(axis=1)
    results[f"R@{k}"] = 100.0 * float(hits.mean()) if len(rows) else 0.0
  top = relevant[:, :map_k].astype(np.float64)
  precision_at_rank = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
  average_precision = ((precision_at_rank * top).sum(axis=1)
                       / np.minimum(counts, map_k))
  results[f"mAP@{map_k}"] = 100.0 * float(average_precision.mean()) if len(rows) else 0.0
  if ndcg_k is not None:
    results[f"NDCG@{ndcg_k}"] = 100.0 * float(_ndcg(relevant[:, :ndcg_k], counts).mean()
                                              ) if len(rows) else 0.0
  results["num_queries"] = len(rows)
  return results
