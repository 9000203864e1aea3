"""Retrieval backends: queries/s and recall@k on clustered embeddings, one table.

  python benchmarks/retrieval.py --sizes=100000,1000000 --queries=1000

For each catalog size M: M unit vectors `[M, dim]` float32 drawn around `--clusters`
random unit centres with gaussian noise (real embeddings are clustered; ScaNN's tree
is useless on uniform random vectors), and `--queries` queries drawn the same way.
Methods:
  numpy   float32 matmul + argpartition per query block: the baseline and the ground
          truth for recall (recall 1 by definition).
  exact   `tigerfg_jax.index` exact backend (jitted matmul + lax.top_k, all devices).
  scann   `tigerfg_jax.index` scann backend with its default settings.
  faiss   faiss IndexFlatIP (exact; skipped with a note if faiss is not importable).
Build time is index construction (training included); search time is one call over
all queries after a warm-up call on the first query batch (so JIT compilation is not
counted). QPS ratios
are against numpy in the same run. All methods share the machine's cores.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

import numpy as np
from absl import app, flags

from tigerfg_jax import index

_SIZES = flags.DEFINE_list("sizes", ["100000", "1000000"], "Catalog sizes M.")
_QUERIES = flags.DEFINE_integer("queries", 1000, "Number of queries.")
_DIM = flags.DEFINE_integer("dim", 256, "Embedding width.")
_CLUSTERS = flags.DEFINE_integer("clusters", 1000, "Cluster centres.")
_NOISE = flags.DEFINE_float("noise", 1.0, "Noise norm relative to a unit centre.")
_K = flags.DEFINE_integer("k", 10, "Neighbours per query.")
_SEED = flags.DEFINE_integer("seed", 0, "Data seed.")

Searcher = Callable[[np.ndarray], np.ndarray]  # queries [Q, E] -> rows [Q, k]


def unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, centres: np.ndarray, count: int,
              noise: float, block: int = 100_000) -> np.ndarray:
  """`[count, E]` float32 unit vectors around unit `centres` `[C, E]` (in blocks)."""
  dim = centres.shape[1]
  out = np.empty((count, dim), np.float32)
  for start in range(0, count, block):
    n = min(block, count - start)
    points = centres[rng.integers(0, len(centres), n)]
    points = points + (noise / np.sqrt(dim)) * rng.standard_normal(
        (n, dim), dtype=np.float32)
    out[start:start + n] = unit_rows(points)
  return out


def numpy_searcher(catalog: np.ndarray, k: int, block: int = 64) -> Searcher:
  def search(queries):
    rows = []
    for start in range(0, len(queries), block):
      scores = queries[start:start + block] @ catalog.T
      top = np.argpartition(-scores, k, axis=1)[:, :k]
      order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
      rows.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(rows)
  return search


def index_searcher(catalog: np.ndarray, k: int, backend: str) -> Searcher:
  idx = index.build(catalog, np.arange(len(catalog)), backend=backend)
  return lambda queries: idx.search(queries, k)[0]


def faiss_searcher(catalog: np.ndarray, k: int) -> Searcher:
  import faiss  # pylint: disable=import-outside-toplevel
  flat = faiss.IndexFlatIP(catalog.shape[1])
  flat.add(catalog)
  return lambda queries: flat.search(queries, k)[1]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
  return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def main(argv):
  del argv
  k = _K.value
  methods: dict[str, Callable[[np.ndarray], Searcher]] = {
      "numpy": lambda c: numpy_searcher(c, k),
      "exact": lambda c: index_searcher(c, k, "exact"),
      "scann": lambda c: index_searcher(c, k, "scann"),
  }
  notes = []
  try:
    import faiss  # pylint: disable=import-outside-toplevel,unused-import
    methods["faiss"] = lambda c: faiss_searcher(c, k)
  except ImportError as e:
    notes.append(f"faiss column skipped: {e}")

  rng = np.random.default_rng(_SEED.value)
  centres = unit_rows(rng.standard_normal((_CLUSTERS.value, _DIM.value), np.float32))
  queries = clustered(rng, centres, _QUERIES.value, _NOISE.value)
  header = (f"{'M':>9} {'method':>7} {'build_s':>8} {'search_s':>9} {'QPS':>10} "
            f"{'QPS/numpy':>10} {'recall@' + str(k):>10}")
  lines = [header, "-" * len(header)]
  for size in (int(s) for s in _SIZES.value):
    catalog = clustered(rng, centres, size, _NOISE.value)
    truth = baseline_qps = None
    for name, make in methods.items():
      start = time.perf_counter()
      search = make(catalog)
      build_s = time.perf_counter() - start
      # Warm-up at the exact backend's query batch shape, so it compiles here.
      search(queries[:index.default_config().query_batch_size])
      start = time.perf_counter()
      rows = search(queries)
      search_s = time.perf_counter() - start
      qps = len(queries) / search_s
      if truth is None:
        truth, baseline_qps = rows, qps
      line = (f"{size:>9} {name:>7} {build_s:>8.2f} {search_s:>9.3f} {qps:>10.0f} "
              f"{qps / baseline_qps:>10.2f} {recall(rows, truth):>10.4f}")
      print(line, flush=True)
      lines.append(line)
      del search, rows
      gc.collect()
    del catalog
    gc.collect()
  print(f"\nclustered data: {_CLUSTERS.value} centres, noise {_NOISE.value}, dim "
        f"{_DIM.value}, {_QUERIES.value} queries, k={k}, {os.cpu_count()} CPU cores")
  print("\n".join(lines + notes))


if __name__ == "__main__":
  app.run(main)
