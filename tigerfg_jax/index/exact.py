"""`exact` backend: on-device dot products + `jax.lax.top_k`, catalog sharded over devices.

The catalog `[M, E]` is zero-padded to `D * S` rows (D devices on a 1-D mesh axis
'items', S rows per device, a multiple of the chunk size C) and placed with
`NamedSharding(mesh, P('items'))`. Per device (`jax.shard_map`), a `lax.scan` walks the
shard in chunks of C rows: scores `[Qb, C]`, the chunk's top k, merged with the running
top k. Padded rows score -inf. The D per-device top-k lists are then merged in the
same jitted function. Memory stays at O(Qb * C) scores per device whatever M is;
queries go in batches of at most `query_batch_size` rows (padded to a power of two so
only a few shapes compile).

Ties: `lax.top_k` puts the lower index first, and every merge lists the lower rows'
candidates first, so equal scores come out in ascending catalog row.
The matmul runs at `Precision.HIGHEST`: TPU/GPU default precision (bf16 / TF32 passes)
would reorder near ties, and this backend is the exact reference.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from tigerfg_jax.index import base

AXIS = "items"

# (scores [Q, C], k) -> (top values [Q, k], their column positions [Q, k]).
Selector = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]


def _shard_top_k(catalog: jax.Array, queries: jax.Array, *, k: int, chunk: int,
                 num_items: int, select: Selector) -> tuple[jax.Array, jax.Array]:
  """One device's top k over its catalog shard `[S, E]`: scores, rows `[1, Q, k]`."""
  shard_rows, dim = catalog.shape
  num_chunks = shard_rows // chunk
  first_row = jax.lax.axis_index(AXIS) * shard_rows
  chunk_starts = first_row + chunk * jnp.arange(num_chunks)

  def step(carry, xs):
    best_scores, best_rows = carry
    block, start = xs
    scores = jnp.matmul(queries, block.T, precision=jax.lax.Precision.HIGHEST)
    rows = start + jnp.arange(chunk)
    scores = jnp.where(rows < num_items, scores, -jnp.inf)
    chunk_scores, positions = select(scores, min(k, chunk))
    merged_scores = jnp.concatenate([best_scores, chunk_scores], axis=1)
    merged_rows = jnp.concatenate([best_rows, rows[positions]], axis=1)
    top_scores, top = jax.lax.top_k(merged_scores, k)
    return (top_scores, jnp.take_along_axis(merged_rows, top, axis=1)), None

  # Placeholders that lose to any real row; marked as varying over the device axis
  # like the per-device results that replace them.
  init = jax.lax.pcast((jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32),
                        jnp.full((queries.shape[0], k), num_items, jnp.int32)),
                       (AXIS,), to="varying")
  blocks = catalog.reshape(num_chunks, chunk, dim)
  (scores, rows), _ = jax.lax.scan(step, init, (blocks, chunk_starts))
  return scores[None], rows[None]


def _search(catalog: jax.Array, queries: jax.Array, *, k: int, chunk: int,
            num_items: int, select: Selector, mesh: jax.sharding.Mesh
            ) -> tuple[jax.Array, jax.Array]:
  """Top k over the sharded catalog: scores `[Q, k]` float32, rows `[Q, k]` int32."""
  local = jax.shard_map(
      functools.partial(_shard_top_k, k=k, chunk=chunk, num_items=num_items,
                        select=select),
      mesh=mesh, in_specs=(P(AXIS), P()), out_specs=(P(AXIS), P(AXIS)))
  scores, rows = local(catalog, queries)  # [D, Q, k] each, device order = row order.
  num_queries = queries.shape[0]
  scores = scores.transpose(1, 0, 2).reshape(num_queries, -1)
  rows = rows.transpose(1, 0, 2).reshape(num_queries, -1)
  top_scores, top = jax.lax.top_k(scores, k)
  return top_scores, jnp.take_along_axis(rows, top, axis=1)


def _query_bucket(num_queries: int, max_batch: int) -> int:
  """Smallest power of two >= num_queries, capped at max_batch."""
  return min(max_batch, 1 << max(0, (num_queries - 1).bit_length()))


class ExactIndex(base.Index):
  """Brute-force top k on the available devices (see the module docstring)."""

  backend = "exact"

  def _select(self, scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    return jax.lax.top_k(scores, k)

  def _build(self) -> None:
    devices = np.array(jax.devices())
    self._mesh = jax.sharding.Mesh(devices, (AXIS,))
    per_device = -(-self.num_items // len(devices))
    self._chunk = min(self.config.chunk_size, per_device)
    shard_rows = -(-per_device // self._chunk) * self._chunk
    padded = np.zeros((len(devices) * shard_rows, self.dim), np.float32)
    padded[:self.num_items] = self.embeddings
    self._catalog = jax.device_put(padded, NamedSharding(self._mesh, P(AXIS)))
    self._queries_sharding = NamedSharding(self._mesh, P())
    self._search_fn = jax.jit(
        functools.partial(_search, chunk=self._chunk, num_items=self.num_items,
                          select=self._select, mesh=self._mesh),
        static_argnames="k")

  @property
  def num_shards(self) -> int:
    """Devices the catalog is sharded over."""
    return len(self._catalog.sharding.device_set)

  def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _query_bucket(len(queries), self.config.query_batch_size)
    rows, scores = [], []
    for start in range(0, len(queries), batch):
      block = queries[start:start + batch]
      padded = np.zeros((batch, self.dim), np.float32)
      padded[:len(block)] = block
      block_scores, block_rows = self._search_fn(
          self._catalog, jax.device_put(padded, self._queries_sharding), k=k)
      rows.append(np.asarray(block_rows)[:len(block)])
      scores.append(np.asarray(block_scores)[:len(block)])
    return np.concatenate(rows).astype(np.int64), np.concatenate(scores)
