"""The one embedding loop: an encoder run over padded batches, rows put in split order.

Used by the retrieval evaluator, the box oracle, the export writer and the export's
reader (which has no model code: this module imports neither flax nor the models).
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

Batch = Mapping[str, np.ndarray]


def array_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict]:
  """In-memory arrays (same leading size M) as padded batches of `batch_size` rows.

  Each batch holds every key of `arrays` (the last one zero-padded to `batch_size`, so
  an encoder compiles for one batch shape), `valid` bool `[batch_size]` and `index`
  int32 `[batch_size]` (the row in `arrays`, -1 on padding), as the eval pipelines'.
  """
  count = len(next(iter(arrays.values())))
  for start in range(0, count, batch_size):
    rows = min(batch_size, count - start)
    batch = {k: np.concatenate([a[start:start + rows],
                                np.zeros((batch_size - rows, *a.shape[1:]), a.dtype)])
             for k, a in arrays.items()}
    batch["valid"] = np.arange(batch_size) < rows
    batch["index"] = np.where(batch["valid"], start + np.arange(batch_size), -1
                              ).astype(np.int32)
    yield batch


def embed_batches(embed_fn: Callable[..., jax.Array], batches: Iterable[Batch],
                  input_keys: Sequence[str], count: int, *,
                  place: Callable[[dict], dict] | None = None,
                  desc: str | None = None) -> np.ndarray:
  """`embed_fn(*inputs) -> [B, E]` over padded batches; float32 `[count, E]` in row order.

  Batches carry `valid` bool `[B]` and `index` int32 `[B]` (the row each batch row
  fills). Every batch is dispatched before any result is fetched: the device runs
  ahead of the host, with one transfer at the end instead of a sync per batch.

  Args:
    embed_fn: jitted encoder taking the batch's `input_keys` arrays in that order.
    batches: padded batches (`data.pipeline.eval_*_batches` or `array_batches`).
    input_keys: the batch keys `embed_fn` takes.
    count: rows of the split (the output's first dimension).
    place: puts a host batch's inputs on devices (e.g. sharded over the mesh);
      None passes the NumPy arrays to `embed_fn` as they are.
    desc: progress-bar label (a bar only on a terminal, on process 0).
  """
  pending = []
  progress = tqdm(batches, desc=desc, leave=False,
                  disable=(desc is None or jax.process_index() != 0
                           or not sys.stderr.isatty()))
  for batch in progress:
    inputs = {k: batch[k] for k in input_keys}
    if place is not None:
      inputs = place(inputs)
    pending.append((embed_fn(*(inputs[k] for k in input_keys)),
                    batch["valid"], batch["index"]))
  if not pending:
    raise ValueError(f"{desc or 'embedding'}: there are no rows to embed")
  fetched = jax.device_get([emb for emb, _, _ in pending])
  out = np.zeros((count, fetched[0].shape[-1]), np.float32)
  for emb, (_, valid, index) in zip(fetched, pending):
    out[index[valid]] = np.asarray(emb)[valid]
  return out
