"""`approx` backend: the `exact` backend with `jax.lax.approx_max_k` as the chunk top k.

On TPU, `approx_max_k` is the hardware-friendly partial reduction that reaches
`recall_target` (default 0.95) of the true top k at a fraction of the cost of a sort;
on CPU and GPU JAX lowers it to sort and slice, i.e. an exact top k. The merge of the per-chunk and
per-device candidates stays exact (`lax.top_k` over a few times k columns), and the
returned scores are always exact dot products of the returned rows.
"""

from __future__ import annotations

import jax

from tigerfg_jax.index import exact


class ApproxIndex(exact.ExactIndex):
  """Sharded, chunked dot-product search with an approximate per-chunk top k."""

  backend = "approx"

  def _select(self, scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    return jax.lax.approx_max_k(scores, k, recall_target=self.config.recall_target)
