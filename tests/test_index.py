"""Retrieval index backends against a NumPy float64 brute-force reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
import pytest

from tigerfg_jax import index

BACKENDS = ("exact", "approx", "scann")


def _normalise(x: np.ndarray) -> np.ndarray:
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random(rng, m, dim):
  return _normalise(rng.standard_normal((m, dim)))


def _clustered(rng, m, dim, clusters=100, noise=0.6):
  """Unit vectors around `clusters` random unit centres (like real embeddings)."""
  centres = _random(rng, clusters, dim)
  points = centres[rng.integers(0, clusters, m)]
  return _normalise(points + noise / np.sqrt(dim) * rng.standard_normal((m, dim)))


def _reference(catalog, queries, k):
  """Float64 top k by descending score, ties by lower row: rows, scores [Q, k]."""
  scores = queries.astype(np.float64) @ catalog.astype(np.float64).T
  rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return rows, np.take_along_axis(scores, rows, axis=1)


def _recall(found, expected):
  return np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, expected)])


@pytest.mark.parametrize("data", ["random", "clustered"])
def test_exact_identical_to_numpy(data):
  rng = np.random.default_rng(0)
  catalog = (_random if data == "random" else _clustered)(rng, 1000, 32)
  queries = _random(rng, 33, 32)
  # 1000 rows in chunks of 96 and 33 queries in batches of 16: both leave a remainder.
  idx = index.build(catalog, np.arange(1000), backend="exact", chunk_size=96,
                    query_batch_size=16)
  ids, scores = idx.search(queries, k=10)
  rows, expected = _reference(catalog, queries, 10)
  np.testing.assert_array_equal(ids, rows)
  np.testing.assert_allclose(scores, expected, atol=1e-5)
  assert scores.dtype == np.float32


@pytest.mark.parametrize("backend", ["exact", "approx"])
def test_padding_rows_never_win_negative_scores(backend):
  rng = np.random.default_rng(10)
  # Positive catalog, negative queries: every real score < 0 = a zero padding row's.
  catalog = np.abs(_random(rng, 100, 8))
  queries = -np.abs(_random(rng, 4, 8))
  idx = index.build(catalog, np.arange(100), backend=backend, chunk_size=64)
  ids, scores = idx.search(queries, k=100)
  rows, expected = _reference(catalog, queries, 100)
  np.testing.assert_array_equal(ids, rows)
  np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_approx_recall_and_exact_scores():
  rng = np.random.default_rng(1)
  catalog = _clustered(rng, 2000, 32)
  queries = _random(rng, 40, 32)
  idx = index.build(catalog, np.arange(2000), backend="approx", chunk_size=500)
  ids, scores = idx.search(queries, k=10)
  rows, _ = _reference(catalog, queries, 10)
  assert _recall(ids, rows) >= 0.95
  # Whatever rows it returns, their scores are their dot products, best first.
  np.testing.assert_allclose(
      scores, np.einsum("qe,qke->qk", queries, catalog[ids]), atol=1e-5)
  assert (np.diff(scores, axis=1) <= 0).all()


def test_scann_brute_force_below_threshold_identical_to_numpy():
  rng = np.random.default_rng(2)
  catalog = _random(rng, 3000, 64)
  queries = _random(rng, 50, 64)
  idx = index.build(catalog, np.arange(3000), backend="scann")
  assert not idx.uses_tree
  ids, scores = idx.search(queries, k=10)
  rows, expected = _reference(catalog, queries, 10)
  np.testing.assert_array_equal(ids, rows)
  np.testing.assert_allclose(scores, expected, atol=1e-5)


def test_scann_tree_recall_on_clustered_data():
  rng = np.random.default_rng(3)
  # Queries from the catalog's own clusters, as a query embedding is near its items.
  points = _clustered(rng, 30_200, 64, clusters=300)
  catalog, queries = points[:30_000], points[30_000:]
  idx = index.build(catalog, np.arange(30_000), backend="scann")
  assert idx.uses_tree
  ids, scores = idx.search(queries, k=10)
  rows, _ = _reference(catalog, queries, 10)
  assert _recall(ids, rows) >= 0.95
  np.testing.assert_allclose(
      scores, np.einsum("qe,qke->qk", queries, catalog[ids]), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_save_load_round_trip(backend, tmp_path):
  rng = np.random.default_rng(4)
  catalog = _clustered(rng, 2000, 16)
  queries = _random(rng, 20, 16)
  names = np.array([f"item-{i}" for i in range(2000)])
  # brute_force_below=0: the ScaNN tree + hashing path, small enough to be quick.
  idx = index.build(catalog, names, backend=backend, brute_force_below=0, chunk_size=300)
  ids, scores = idx.search(queries, k=7)
  idx.save(str(tmp_path / "saved"))
  # A moved directory still loads (ScaNN assets are saved with relative paths).
  shutil.move(str(tmp_path / "saved"), str(tmp_path / "moved"))
  loaded = index.load(str(tmp_path / "moved"))
  assert type(loaded) is type(idx)
  assert loaded.config.chunk_size == 300
  loaded_ids, loaded_scores = loaded.search(queries, k=7)
  np.testing.assert_array_equal(loaded_ids, ids)
  np.testing.assert_array_equal(loaded_scores, scores)
  assert str(ids[0, 0]).startswith("item-")


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_equals_building_on_everything(backend):
  rng = np.random.default_rng(5)
  catalog = _random(rng, 1000, 16)
  queries = _random(rng, 15, 16)
  idx = index.build(catalog[:600], np.arange(600), backend=backend, chunk_size=128)
  idx.add(catalog[600:], np.arange(600, 1000))
  assert idx.num_items == 1000
  ids, scores = idx.search(queries, k=10)
  rows, expected = _reference(catalog, queries, 10)
  if backend == "approx":
    assert _recall(ids, rows) >= 0.95
  else:
    np.testing.assert_array_equal(ids, rows)
  np.testing.assert_allclose(
      scores, np.einsum("qe,qke->qk", queries, catalog[ids]), atol=1e-5)


def test_scann_tree_add_finds_new_items():
  rng = np.random.default_rng(6)
  catalog = _clustered(rng, 3000, 16, clusters=30)
  idx = index.build(catalog[:2000], np.arange(2000), backend="scann",
                    brute_force_below=0)
  idx.add(catalog[2000:], np.arange(2000, 3000))
  assert idx.uses_tree and idx.num_items == 3000
  ids, _ = idx.search(catalog[2000:], k=1)
  # Each added item's nearest neighbour is itself (dot product 1).
  assert np.mean(ids[:, 0] == np.arange(2000, 3000)) >= 0.99


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_above_catalog_size_pads_and_empty_batch(backend):
  rng = np.random.default_rng(7)
  catalog = _random(rng, 5, 8)
  queries = _random(rng, 3, 8)
  for ids_in, empty in ((np.arange(10, 15), -1), (["a", "b", "c", "d", "e"], "")):
    idx = index.build(catalog, ids_in, backend=backend)
    ids, scores = idx.search(queries, k=8)
    assert ids.shape == scores.shape == (3, 8)
    rows, expected = _reference(catalog, queries, 5)
    np.testing.assert_array_equal(ids[:, :5], np.asarray(ids_in)[rows])
    np.testing.assert_allclose(scores[:, :5], expected, atol=1e-5)
    assert (ids[:, 5:] == empty).all() and np.isneginf(scores[:, 5:]).all()
    ids, scores = idx.search(np.zeros((0, 8), np.float32), k=4)
    assert ids.shape == scores.shape == (0, 4)


@pytest.mark.parametrize("backend", ["exact", "approx"])
def test_ties_come_out_lower_row_first(backend):
  rng = np.random.default_rng(8)
  catalog = _random(rng, 50, 8)
  tied = [3, 11, 12, 30, 47]  # spread over chunks of 8 rows
  catalog[tied] = catalog[20]
  idx = index.build(catalog, np.arange(50), backend=backend, chunk_size=8)
  ids, _ = idx.search(catalog[20:21], k=6)
  np.testing.assert_array_equal(ids[0], [3, 11, 12, 20, 30, 47])


@pytest.mark.parametrize("call, error, match", [
    (lambda: index.build(np.zeros((4, 3), np.int32), range(4)), TypeError,
     "embeddings: expected a floating dtype"),
    (lambda: index.build(np.zeros(4, np.float32), range(4)), ValueError,
     r"embeddings: expected a 2-D float array \[N, E\]"),
    (lambda: index.build(np.full((2, 3), np.nan, np.float32), range(2)), ValueError,
     "NaN or inf"),
    (lambda: index.build(np.zeros((0, 3), np.float32), []), ValueError, "empty"),
    (lambda: index.build(np.ones((4, 3), np.float32), range(3)), ValueError,
     "ids: expected a 1-D sequence of 4 ids"),
    (lambda: index.build(np.ones((2, 3), np.float32), [0, -2]), ValueError, ">= 0"),
    (lambda: index.build(np.ones((2, 3), np.float32), range(2), leaves=3), ValueError,
     r"unknown keys \['leaves'\]"),
    (lambda: index.build(np.ones((2, 3), np.float32), range(2), backend="faiss"),
     ValueError, "backend='faiss'"),
    (lambda: index.build(np.ones((2, 3), np.float32), range(2), backend="exact")
     .search(np.ones((1, 4), np.float32), 1), ValueError, "queries: expected embedding "
     "width E=3"),
    (lambda: index.build(np.ones((2, 3), np.float32), range(2), backend="exact")
     .search(np.ones(3, np.float32), 1), ValueError, r"queries: expected a 2-D"),
    (lambda: index.build(np.ones((2, 3), np.float32), range(2), backend="exact")
     .search(np.ones((1, 3), np.float32), 0), ValueError, "k: expected a positive"),
    (lambda: index.build(np.ones((2, 3), np.float32), range(2), backend="exact")
     .add(np.ones((1, 3), np.float32), ["x"]), TypeError, "index holding int64 ids"),
])
def test_bad_inputs_name_the_problem(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_config_section_with_other_keys_is_accepted():
  config = ml_collections.ConfigDict(dict(backend="exact", batch_size=64, every=0,
                                          chunk_size=3))
  idx = index.build(np.eye(4, dtype=np.float32), range(4), config, query_batch_size=2)
  assert idx.backend == "exact"
  assert (idx.config.chunk_size, idx.config.query_batch_size) == (3, 2)
  assert "batch_size" not in idx.config


def test_load_rejects_missing_manifest(tmp_path):
  with pytest.raises(FileNotFoundError, match="manifest.json"):
    index.load(str(tmp_path))


_MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import jax
    import numpy as np
    from tigerfg_jax import index
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(9)
    catalog = rng.standard_normal((1003, 32)).astype(np.float32)
    catalog /= np.linalg.norm(catalog, axis=1, keepdims=True)
    catalog[[5, 400, 1002]] = catalog[700]  # ties on three different devices
    queries = np.concatenate([catalog[700:701], rng.standard_normal((20, 32))])
    queries = queries.astype(np.float32)
    scores = queries.astype(np.float64) @ catalog.astype(np.float64).T
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    for backend in ("exact", "approx"):
      idx = index.build(catalog, np.arange(1003), backend=backend, chunk_size=64)
      assert idx.num_shards == 4, idx.num_shards
      ids, found = idx.search(queries, k=10)
      np.testing.assert_array_equal(ids, rows)
      np.testing.assert_allclose(found, np.take_along_axis(scores, rows, 1), atol=1e-5)
    print("MULTI_DEVICE_OK")
""")


def test_exact_sharded_over_four_devices_identical_to_numpy():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE_SCRIPT], env=env,
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "MULTI_DEVICE_OK" in result.stdout
