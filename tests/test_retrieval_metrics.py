"""Recall@k / mAP@k / NDCG@k against hand-worked examples and a loop-by-loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tigerfg_jax.evaluation import retrieval_metrics


def test_hand_worked_three_queries():
  rows = np.array([[3, 7, 1, 4, 9],
                   [2, 0, 5, 6, 8],
                   [1, 2, 3, 4, 5]])
  positives = [{7, 9}, {2}, [10, 11]]
  result = retrieval_metrics.retrieval_metrics(rows, positives)
  # q0: positives at ranks 2 and 5 -> R@1 miss, R@5 hit, R@10 (5 rows) hit;
  #     AP@10 = (P@2 + P@5) / min(2, 10) = (1/2 + 2/5) / 2 = 0.45.
  # q1: positive at rank 1 -> hits everywhere; AP = P@1 / 1 = 1.
  # q2: no positive ranked -> misses; AP = 0.
  assert result["R@1"] == pytest.approx(100 * 1 / 3)
  assert result["R@5"] == pytest.approx(100 * 2 / 3)
  assert result["R@10"] == pytest.approx(100 * 2 / 3)
  assert result["mAP@10"] == pytest.approx(100 * (0.45 + 1.0 + 0.0) / 3)
  assert result["num_queries"] == 3


def test_ap_normaliser_caps_at_k():
  # 4 positives, map_k=2, first two rows positive: (P@1 + P@2) / min(4, 2) = 2 / 2 = 1.
  result = retrieval_metrics.retrieval_metrics(np.array([[5, 6, 7]]), [{5, 6, 7, 8}],
                                     ks=(1,), map_k=2)
  assert result["mAP@2"] == pytest.approx(100.0)
  # Positives at ranks 1 and 3 of 3, map_k=3, |P| = 4: (1/1 + 2/3) / min(4, 3) = 5/9.
  result = retrieval_metrics.retrieval_metrics(np.array([[5, 1, 6]]), [[5, 6, 7, 8]],
                                     ks=(1,), map_k=3)
  assert result["mAP@3"] == pytest.approx(100 * 5 / 9)


def test_ties_follow_rank_by_score_lower_row_first():
  scores = np.array([[0.5, 0.9, 0.5, 0.9]])
  rows = retrieval_metrics.rank_by_score(scores, k=4)
  # Rows 1 and 3 tie at 0.9 (row 1 first), rows 0 and 2 tie at 0.5 (row 0 first).
  np.testing.assert_array_equal(rows, [[1, 3, 0, 2]])
  result = retrieval_metrics.retrieval_metrics(rows, [{3}], ks=(1, 2), map_k=2)
  # The tie puts the positive row 3 second: R@1 = 0, R@2 = 100, AP@2 = P@2 / 1 = 1/2.
  assert result["R@1"] == 0.0
  assert result["R@2"] == 100.0
  assert result["mAP@2"] == pytest.approx(50.0)


def test_padding_rows_and_duplicate_positives():
  # -1 marks "no item" (catalog smaller than k); repeated positives count once.
  result = retrieval_metrics.retrieval_metrics(np.array([[4, -1, -1]]), [[4, 4, 9]],
                                     ks=(1, 3), map_k=3)
  assert result["R@1"] == 100.0
  # AP@3 = P@1 / min(|{4, 9}|, 3) = 1 / 2.
  assert result["mAP@3"] == pytest.approx(50.0)


def _reference(rows, positives, ks, map_k):
  """The definitions, one query and one rank at a time."""
  recalls = {k: 0.0 for k in ks}
  ap_sum = 0.0
  for ranking, query_positives in zip(rows.tolist(), positives):
    query_positives = set(query_positives)
    for k in ks:
      recalls[k] += any(r in query_positives for r in ranking[:k])
    hits, ap = 0, 0.0
    for rank, row in enumerate(ranking[:map_k], start=1):
      if row in query_positives:
        hits += 1
        ap += hits / rank
    ap_sum += ap / min(len(query_positives), map_k)
  out = {f"R@{k}": 100 * v / len(rows) for k, v in recalls.items()}
  out[f"mAP@{map_k}"] = 100 * ap_sum / len(rows)
  return out


def test_ndcg_hand_worked():
  # q0: positives {7, 9} at ranks 2 and 5: DCG = 1/log2(3) + 1/log2(6); ideal (2
  #     positives first) = 1 + 1/log2(3). q1: one positive at rank 1: 1. q2: none: 0.
  rows = np.array([[3, 7, 1, 4, 9], [2, 0, 5, 6, 8], [1, 2, 3, 4, 5]])
  result = retrieval_metrics.retrieval_metrics(rows, [{7, 9}, {2}, [10, 11]], ndcg_k=5)
  q0 = (1 / np.log2(3) + 1 / np.log2(6)) / (1 + 1 / np.log2(3))
  assert result["NDCG@5"] == pytest.approx(100 * (q0 + 1.0 + 0.0) / 3)
  assert "NDCG@5" not in retrieval_metrics.retrieval_metrics(rows, [{7}, {2}, {1}])


def _reference_ndcg(rows, positives, k):
  total = 0.0
  for ranking, query_positives in zip(rows.tolist(), positives):
    dcg = sum(1 / math.log2(rank + 1) for rank, row in enumerate(ranking[:k], start=1)
              if row in set(query_positives))
    ideal = sum(1 / math.log2(rank + 1)
                for rank in range(1, min(len(set(query_positives)), k) + 1))
    total += dcg / ideal
  return 100 * total / len(rows)


def test_random_ndcg_matches_reference():
  rng = np.random.default_rng(1)
  rows = np.stack([rng.permutation(60)[:20] for _ in range(40)])
  positives = [set(rng.choice(60, size=rng.integers(1, 15), replace=False).tolist())
               for _ in range(40)]
  result = retrieval_metrics.retrieval_metrics(rows, positives, ndcg_k=10)
  assert result["NDCG@10"] == pytest.approx(_reference_ndcg(rows, positives, 10))


def test_random_rankings_match_reference():
  rng = np.random.default_rng(0)
  rows = np.stack([rng.permutation(40)[:12] for _ in range(50)])
  positives = [set(rng.choice(40, size=rng.integers(1, 6), replace=False).tolist())
               for _ in range(50)]
  result = retrieval_metrics.retrieval_metrics(rows, positives, ks=(1, 5, 10), map_k=10)
  expected = _reference(rows, positives, (1, 5, 10), 10)
  for key, value in expected.items():
    assert result[key] == pytest.approx(value), key


def test_rank_by_score_matches_full_sort():
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 5, size=(6, 30)).astype(np.float32)  # many ties
  rows = retrieval_metrics.rank_by_score(scores, k=7)
  for query in range(6):
    expected = sorted(range(30), key=lambda r: (-scores[query, r], r))[:7]
    np.testing.assert_array_equal(rows[query], expected)


@pytest.mark.parametrize("rows, positives, match", [
    (np.array([[1, 2]]), [set()], r"positives\[0\]: empty"),
    (np.array([[1, 1]]), [{1}], r"ranked_item_rows\[0\]: a row appears twice"),
    (np.array([[1, 2]]), [{1}, {2}], "one collection per query"),
    (np.array([[1.0, 2.0]]), [{1}], "2-D integer array"),
])
def test_bad_inputs(rows, positives, match):
  with pytest.raises(ValueError, match=match):
    retrieval_metrics.retrieval_metrics(rows, positives)


def test_rank_by_score_rejects_nan():
  with pytest.raises(ValueError, match="NaN"):
    retrieval_metrics.rank_by_score(np.array([[0.1, np.nan]]), k=1)
