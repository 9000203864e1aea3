"""The `Index` interface every retrieval backend implements, its config and checks.

An index holds a catalog of M L2-normalised embeddings `[M, E]` float32 and one id per
row (non-negative integers or strings). Similarity is the dot product (= cosine for
normalised vectors). `search(queries [Q, E], k)` returns `(ids [Q, k], scores [Q, k])`
sorted by descending score.

Conventions shared by all backends:
  * k > M (or a backend finding fewer than k candidates): the result keeps its
    `[Q, k]` shape; positions without an item hold the empty id (`-1` for integer ids,
    `''` for string ids) and the score `-inf`, after all real hits.
  * An empty query batch `[0, E]` gives `[0, k]` results.
  * The index keeps a host copy of the catalog (the source of truth for `save` and
    `add`); `add` appends rows and rebuilds the backend's search structure.
  * Ids are not checked for uniqueness: a repeated id is returned once per row.

On disk (`save(directory)`): `manifest.json` (format, backend, sizes, full config),
`embeddings.npy`, `ids.npy`, plus whatever the backend writes (ScaNN: `scann/`).
"""

from __future__ import annotations

import abc
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import ml_collections
import numpy as np

MANIFEST = "manifest.json"
FORMAT = "tigerfg_jax.index"
FORMAT_VERSION = 1
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.npy"


def default_config() -> ml_collections.ConfigDict:
  """Every index option with its default; each backend reads only its own keys."""
  return ml_collections.ConfigDict(dict(
      backend="scann",              # 'scann' | 'exact' | 'approx'.
      # scann: below this many items the searcher is an exact float32 brute-force scan
      # (a scan of 20k x 256 is ~5M multiply-adds per query, well under a millisecond,
      # while a tree of ~sqrt(M) tiny leaves costs seconds of k-means and some recall).
      brute_force_below=20_000,
      num_leaves=0,                 # tree leaves; 0 = round(sqrt(M)).
      leaves_to_search=0,           # 0 = max(10% of the leaves, min(leaves, 20)).
      training_sample_size=100_000,  # k-means / AH training rows (capped at M).
      dims_per_block=2,             # asymmetric hashing: dimensions per 4-bit code.
      anisotropic_threshold=0.2,    # AH anisotropic loss threshold (ScaNN's MIPS default).
      reorder_k=0,                  # AH candidates re-scored exactly; 0 = max(100, 10 k).
      # exact / approx: catalog rows scored per step and device, queries per call.
      chunk_size=16_384,
      query_batch_size=1024,
      recall_target=0.95,           # approx: jax.lax.approx_max_k recall target.
  ))


def resolve_config(config: Mapping[str, Any] | None = None,
                   **overrides: Any) -> ml_collections.ConfigDict:
  """`default_config()` updated with `config`, then `overrides`.

  `config` may be a larger section (e.g. the experiment's `config.eval`, whose keys
  the experiment config already validates): only index keys are read from it.
  `overrides` must all be index keys.
  """
  resolved = default_config()
  unknown = sorted(set(overrides) - set(resolved.keys()))
  if unknown:
    raise ValueError(f"index config: unknown keys {unknown}; known keys are "
                     f"{sorted(resolved.keys())}")
  if config is not None:
    resolved.update({k: v for k, v in config.items() if k in resolved})
  resolved.update(overrides)
  for key in ("chunk_size", "query_batch_size", "dims_per_block",
              "training_sample_size"):
    if resolved[key] < 1:
      raise ValueError(f"index config: {key}={resolved[key]} must be >= 1")
  for key in ("brute_force_below", "num_leaves", "leaves_to_search", "reorder_k"):
    if resolved[key] < 0:
      raise ValueError(f"index config: {key}={resolved[key]} must be >= 0")
  if not 0.0 < resolved.recall_target <= 1.0:
    raise ValueError(
        f"index config: recall_target={resolved.recall_target} must be in (0, 1]")
  return resolved


def as_embeddings(array: Any, name: str, dim: int | None = None) -> np.ndarray:
  """Checks `array` is a finite float matrix `[N, E]` and returns it as float32."""
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D float array [N, E], got shape "
                     f"{array.shape}")
  if array.dtype.kind != "f":
    raise TypeError(f"{name}: expected a floating dtype (float32), got {array.dtype}")
  if dim is not None and array.shape[1] != dim:
    raise ValueError(f"{name}: expected embedding width E={dim} (the index's), got "
                     f"shape {array.shape}")
  array = np.ascontiguousarray(array, dtype=np.float32)
  if not np.isfinite(array).all():
    raise ValueError(f"{name}: contains NaN or inf")
  return array


def as_ids(ids: Sequence[str] | np.ndarray, count: int, name: str = "ids") -> np.ndarray:
  """Checks `ids` is 1-D with `count` strings or non-negative integers."""
  ids = np.asarray(ids)
  if ids.dtype.kind == "O" and all(isinstance(i, str) for i in ids.ravel()):
    ids = ids.astype(str)
  if ids.ndim != 1 or len(ids) != count:
    raise ValueError(f"{name}: expected a 1-D sequence of {count} ids (one per "
                     f"embedding row), got shape {ids.shape}")
  if ids.dtype.kind in "iu":
    ids = ids.astype(np.int64)
    if count and ids.min() < 0:
      raise ValueError(f"{name}: integer ids must be >= 0 (-1 marks 'no item')")
  elif ids.dtype.kind != "U":
    raise TypeError(f"{name}: expected str or integer ids, got dtype {ids.dtype}")
  return ids


def empty_id(ids: np.ndarray) -> str | int:
  """The id that fills result positions holding no item."""
  return "" if ids.dtype.kind == "U" else -1


class Index(abc.ABC):
  """A searchable catalog. Subclasses implement `_build` and `_search_rows`.

  Attributes:
    config: the resolved index config (`default_config()` keys).
    embeddings: host catalog `[M, E]` float32.
    ids: `[M]` ids (int64 or str), `ids[row]` names catalog row `row`.
  """

  backend: ClassVar[str]

  def __init__(self, embeddings: np.ndarray, ids: Sequence[str] | np.ndarray,
               config: ml_collections.ConfigDict, saved_dir: str | None = None):
    """Checks the catalog, then builds (or, from `saved_dir`, restores) the searcher."""
    self.config = config
    self.embeddings = as_embeddings(embeddings, "embeddings")
    if not len(self.embeddings):
      raise ValueError("embeddings: the catalog is empty (M = 0)")
    self.ids = as_ids(ids, len(self.embeddings))
    if saved_dir is None:
      self._build()
    else:
      self._restore(saved_dir)

  @property
  def num_items(self) -> int:
    return self.embeddings.shape[0]

  @property
  def dim(self) -> int:
    return self.embeddings.shape[1]

  @abc.abstractmethod
  def _build(self) -> None:
    """(Re)builds the search structure from `self.embeddings`."""

  def _restore(self, directory: str) -> None:
    """Restores the search structure saved in `directory` (default: rebuild)."""
    del directory
    self._build()

  def _save_backend(self, directory: str) -> None:
    """Writes backend files next to the manifest (default: none)."""
    del directory

  @abc.abstractmethod
  def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k catalog rows of `queries` `[Q, E]` float32 (Q >= 1, 1 <= k <= M).

    Returns:
      rows `[Q, k]` int (-1 where there is no item) and scores `[Q, k]` float32
      (-inf there), by descending score.
    """

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns the ids `[Q, k]` and dot-product scores `[Q, k]` float32 of the top k."""
    queries = as_embeddings(queries, "queries", dim=self.dim)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k: expected a positive integer, got {k!r}")
    k = int(k)
    rows = np.full((len(queries), k), -1, np.int64)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    found = min(k, self.num_items)
    if len(queries):
      found_rows, found_scores = self._search_rows(queries, found)
      rows[:, :found] = found_rows
      scores[:, :found] = found_scores
    ids = np.full(rows.shape, empty_id(self.ids), self.ids.dtype)
    hit = rows >= 0
    ids[hit] = self.ids[rows[hit]]
    return ids, scores

  def add(self, embeddings: np.ndarray, ids: Sequence[str] | np.ndarray) -> None:
    """Appends rows `[N, E]` with their ids and rebuilds the search structure."""
    embeddings = as_embeddings(embeddings, "embeddings", dim=self.dim)
    ids = as_ids(ids, len(embeddings))
    if len(ids) and (ids.dtype.kind == "U") != (self.ids.dtype.kind == "U"):
      raise TypeError(f"ids: got {ids.dtype} ids for an index holding "
                      f"{self.ids.dtype} ids")
    self.embeddings = np.concatenate([self.embeddings, embeddings])
    self.ids = np.concatenate([self.ids, ids])
    self._build()

  def save(self, directory: str) -> None:
    """Writes the index to `directory` (created if needed); `index.load` reads it."""
    os.makedirs(directory, exist_ok=True)
    np.save(os.path.join(directory, EMBEDDINGS_FILE), self.embeddings)
    np.save(os.path.join(directory, IDS_FILE), self.ids)
    self._save_backend(directory)
    manifest = dict(format=FORMAT, version=FORMAT_VERSION, backend=self.backend,
                    num_items=self.num_items, dim=self.dim,
                    embeddings=EMBEDDINGS_FILE, ids=IDS_FILE,
                    config=self.config.to_dict())
    with open(os.path.join(directory, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2)


def read_manifest(directory: str) -> dict[str, Any]:
  """Reads and checks `directory/manifest.json`."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no index manifest (write one with Index.save)")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
    raise ValueError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, "
                     f"got {manifest.get('format')!r} version {manifest.get('version')}")
  for key in ("backend", "num_items", "dim", "embeddings", "ids", "config"):
    if key not in manifest:
      raise ValueError(f"{path}: missing field {key!r}")
  return manifest
