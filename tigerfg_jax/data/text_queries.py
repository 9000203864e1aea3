"""Text queries of a split as arrays: what training batches and evaluation read.

A split's `text_queries.jsonl` (docs/DATA.md) lists typed queries with their relevant
items. Training draws, for each example, one text query that lists the example's item
(none: `text_valid` False), with probability proportional to 1 / (its number of
relevant items). Drawn uniformly among an item's queries, a query would come up in
proportion to how many items it lists: "red mug" (30 items) thirty times as often as
"red mug with blue stripes" (one), and the specific queries, the ones that name what
only the image shows, would be a few percent of the examples (3.7% of the draws on the
tiny synthetic train split; with 1 / |relevant|, 23%). The batch carries the query's tokens,
its relevant item rows and the example's own item row, so the train step can tell, for
any two rows of the global batch, whether the item of one is relevant to the text query
of the other (`training.step.text_positives`) without the pipeline seeing other
processes' rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from tigerfg_jax.data import tokenizer as tokenizer_lib

# Relevant items a training example carries for its text query (P). A query with more
# keeps its example's own item and the first others in file order; the rest, should
# they share the batch, count as negatives of it.
MAX_RELEVANT = 64


@dataclasses.dataclass(frozen=True)
class TextQueryTable:
  """The split's text queries, tokenized, with the queries of each item (CSR).

  tokens int32 `[T, Lq]`, mask bool `[T, Lq]`; relevant int32 `[T, P]` item rows (-1
  pads); `item_offsets` int64 `[num_items + 1]` and `item_queries` int64: the text
  queries listing item r are `item_queries[item_offsets[r]:item_offsets[r + 1]]`;
  `item_query_cdf` float64, aligned with `item_queries`: per item, the cumulative
  probability of drawing each of its queries (module docstring).
  """
  tokens: np.ndarray
  mask: np.ndarray
  relevant: np.ndarray
  item_offsets: np.ndarray
  item_queries: np.ndarray
  item_query_cdf: np.ndarray

  @classmethod
  def build(cls, texts: Sequence[str], positives: Sequence[Sequence[int]], num_items: int,
            tokenizer: tokenizer_lib.TitleTokenizer, max_query_len: int) -> TextQueryTable:
    if not texts:
      raise ValueError("the train split has no text queries (text_queries.jsonl, "
                       "docs/DATA.md), and the objective has a text term (loss.w_t2i / "
                       "loss.w_t2modal)")
    tokens, mask = tokenizer.encode(list(texts), max_query_len)
    width = min(MAX_RELEVANT, max(len(p) for p in positives))
    relevant = np.full((len(texts), width), -1, np.int32)
    for t, rows in enumerate(positives):
      relevant[t, :min(width, len(rows))] = list(rows)[:width]
    pairs = sorted((int(r), t) for t, rows in enumerate(positives) for r in rows)
    counts = np.bincount([r for r, _ in pairs], minlength=num_items)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    queries = np.asarray([t for _, t in pairs], np.int64)
    weights = 1.0 / np.asarray([len(positives[t]) for t in queries], np.float64)
    cdf = np.empty_like(weights)
    for r in np.flatnonzero(counts):
      item_weights = weights[offsets[r]:offsets[r + 1]]
      cdf[offsets[r]:offsets[r + 1]] = np.cumsum(item_weights) / item_weights.sum()
    return cls(tokens=tokens, mask=mask, relevant=relevant, item_offsets=offsets,
               item_queries=queries, item_query_cdf=cdf)

  def sample(self, item_rows: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One text query per example item row (drawn as the module docstring says).

    Returns `text_tokens` int32 `[n, Lq]`, `text_mask` bool `[n, Lq]`, `text_valid`
    bool `[n]` (the item has a text query), `text_relevant` int32 `[n, P]` (its
    relevant rows, always including the example's own item; -1 pads) and `item_row`
    int32 `[n]`.
    """
    n = len(item_rows)
    chosen = np.full(n, -1, np.int64)
    for e, row in enumerate(item_rows):
      start, stop = self.item_offsets[row], self.item_offsets[row + 1]
      if stop > start:
        pick = np.searchsorted(self.item_query_cdf[start:stop], rng.random(), side="right")
        chosen[e] = self.item_queries[start + min(int(pick), stop - start - 1)]
    valid = chosen >= 0
    safe = np.maximum(chosen, 0)
    relevant = np.where(valid[:, None], self.relevant[safe], -1)
    for e in np.flatnonzero(valid):
      if item_rows[e] not in relevant[e]:
        relevant[e, -1] = item_rows[e]
    return {"text_tokens": np.where(valid[:, None], self.tokens[safe], 0).astype(np.int32),
            "text_mask": self.mask[safe] & valid[:, None],
            "text_valid": valid,
            "text_relevant": relevant.astype(np.int32),
            "item_row": np.asarray(item_rows, np.int32)}
