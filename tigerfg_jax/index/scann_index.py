"""`scann` backend: ScaNN on the host CPU (tree + asymmetric hashing + exact reorder).

Catalogs with at least `brute_force_below` (20k) items get a k-means tree of
`num_leaves` (default round(sqrt(M))) leaves, of which `leaves_to_search` (default 10%,
at least min(leaves, 20)) are scanned per query with 4-bit asymmetric hashing
(`dims_per_block` dims per code, anisotropic loss), and the best `reorder_k` (default
max(100, 10 k)) candidates are re-scored exactly in float32. Smaller catalogs get an
exact float32 brute-force scan: see `base.default_config` for why.

The tree is trained on the catalog, so it partitions clustered data (real embeddings)
well and uniform random vectors badly (low recall: there are no clusters to find).
Queries are expected to fall near catalog items (recall@10 >= 0.99 on clustered data
with the defaults); queries far from every cluster need more `leaves_to_search`.
`add` rebuilds the whole searcher, retraining the tree at the new size: ScaNN's
in-place upsert would keep leaves trained on the old catalog and their old count.
Results: exact dot products of the returned rows, by descending score; ties in an
unspecified order; the searcher may find fewer than k items when the searched leaves
hold fewer, and those positions are padded (see `base`).
"""

from __future__ import annotations

import math
import os

import numpy as np
from scann.scann_ops.py import scann_ops_pybind

from tigerfg_jax.index import base

SUBDIR = "scann"


class ScannIndex(base.Index):
  """A ScaNN searcher over the catalog (see the module docstring)."""

  backend = "scann"

  @property
  def uses_tree(self) -> bool:
    return self.num_items >= self.config.brute_force_below

  def _build(self) -> None:
    config = self.config
    # ScaNN takes k at build time too; search passes the real k each call.
    builder = scann_ops_pybind.builder(self.embeddings, 10, "dot_product")
    if self.uses_tree:
      leaves = min(self.num_items, config.num_leaves or round(math.sqrt(self.num_items)))
      to_search = config.leaves_to_search or max(math.ceil(0.1 * leaves), min(leaves, 20))
      builder = builder.tree(
          num_leaves=leaves, num_leaves_to_search=min(to_search, leaves),
          training_sample_size=min(self.num_items, config.training_sample_size),
      ).score_ah(
          config.dims_per_block,
          anisotropic_quantization_threshold=config.anisotropic_threshold,
      ).reorder(100)
    else:
      builder = builder.score_brute_force()
    self._searcher = builder.build()

  def _restore(self, directory: str) -> None:
    self._searcher = scann_ops_pybind.load_searcher(os.path.join(directory, SUBDIR))

  def _save_backend(self, directory: str) -> None:
    path = os.path.join(directory, SUBDIR)
    os.makedirs(path, exist_ok=True)
    # Relative asset paths let the saved directory be moved or copied.
    self._searcher.serialize(path, relative_path=True)

  def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    reorder = None
    if self.uses_tree:
      reorder = max(k, self.config.reorder_k or max(100, 10 * k))
    rows, scores = self._searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder)
    rows = rows.astype(np.int64)
    scores = np.array(scores, np.float32)
    # ScaNN pads short result lists with row 0 and NaN.
    missing = np.isnan(scores)
    rows[missing] = -1
    scores[missing] = -np.inf
    return rows, scores
