"""Retrieval indexes over L2-normalised embeddings: one interface, three backends.

```python
from tigerfg_jax import index
idx = index.build(item_emb, item_ids, backend="exact")   # or a ConfigDict
ids, scores = idx.search(query_emb, k=10)                 # [Q, k] each, best first
idx.save(directory); idx = index.load(directory)
```

Backends: `scann` (host CPU, `scann_index`), `exact` (on-device top k, sharded over
devices, `exact`), `approx` (`jax.lax.approx_max_k`, `approx`). Options and their
defaults: `default_config()`; shared conventions (padding when k > M, ties, files on
disk): `base`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tigerfg_jax.index import approx, exact, scann_index
from tigerfg_jax.index.base import Index, default_config, read_manifest, resolve_config

BACKENDS: dict[str, type[Index]] = {
    "scann": scann_index.ScannIndex,
    "exact": exact.ExactIndex,
    "approx": approx.ApproxIndex,
}

__all__ = ["BACKENDS", "Index", "build", "default_config", "load"]


def _backend_class(name: str) -> type[Index]:
  if name not in BACKENDS:
    raise ValueError(f"index config: backend={name!r}; expected one of {list(BACKENDS)}")
  return BACKENDS[name]


def build(embeddings: np.ndarray, ids: Sequence[str] | np.ndarray,
          config: Mapping[str, Any] | None = None, **overrides: Any) -> Index:
  """Builds an index over `embeddings` `[M, E]` float32 named by `ids` `[M]`.

  Args:
    embeddings: the catalog, L2-normalised rows (similarity is the dot product).
    ids: one id per row: strings or non-negative integers.
    config: index options (a ConfigDict or mapping; keys other than
      `default_config()`'s are ignored, so `config.eval` can be passed as is).
    **overrides: options that take precedence over `config`, e.g. `backend='exact'`;
      unknown names are an error.
  """
  config = resolve_config(config, **overrides)
  return _backend_class(config.backend)(embeddings, ids, config)


def load(directory: str) -> Index:
  """Reads an index written by `Index.save(directory)`."""
  manifest = read_manifest(directory)
  config = resolve_config(manifest["config"])
  embeddings = np.load(os.path.join(directory, manifest["embeddings"]))
  ids = np.load(os.path.join(directory, manifest["ids"]))
  if embeddings.shape != (manifest["num_items"], manifest["dim"]):
    raise ValueError(f"{directory}/{manifest['embeddings']}: shape {embeddings.shape} "
                     f"does not match the manifest's [{manifest['num_items']}, "
                     f"{manifest['dim']}]")
  return _backend_class(manifest["backend"])(embeddings, ids, config,
                                             saved_dir=directory)
