"""A TIGER-FG export on disk: its layout, its checksummed manifest, and its loader.

`tigerfg_jax.serving.export` writes an export directory; this module reads it back with
JAX and ScaNN alone: the encoders are `jax.export` artifacts (StableHLO with the weights
baked in), so no model code (`tigerfg_jax.models`, flax) is imported here.

  EXPORT/
    manifest.json          format, versions, creation time, sha256 + size of every file
    item_encoder.jax       uint8 [b, Si, Si, 3], int32 [b, L], bool [b, L] -> [b, E]
    query_encoder.jax      uint8 [b, Sq, Sq, 3] -> float32 [b, E] (image queries; not
                           in a text_query-stage export)
    text_query_encoder.jax int32 [b, Lq], bool [b, Lq] -> float32 [b, E] (text queries;
                           when the model has a text query tower)
    preprocessing.json     image sizes, max title / query length, E, the catalog split
    tokenizer.json         the run's title tokenizer
    config.json            the run's full experiment config (for the record)
    catalog.jsonl          {"item_id", "title"} per catalog row, in index row order
    index/                 `tigerfg_jax.index` ScaNN index (embeddings.npy, ids.npy, ...)

Images are preprocessed as the evaluator does (`data.pipeline.eval_image`:
decode to RGB, squash to S x S, bilinear); pixel normalisation is
inside the encoders.

```python
model = artifact.load("EXPORT")                    # verifies every checksum first
ids, scores = model.search(model.load_images(["q.jpg"], "query"), k=10)  # [1, 10]
ids, scores = model.search_text(["red mug with blue stripes"], k=10)     # [1, 10]
```

E is the item embedding's width: 2 x config.model.embed_dim for the 'smar' fusion (its
item vector is [multimodal, text] and its query vector the gated [a q, (1 - a) q]).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax import export as jax_export

from tigerfg_jax import index as index_lib
from tigerfg_jax.data import pipeline
from tigerfg_jax.data import tokenizer as tokenizer_lib
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.evaluation import embedding

FORMAT = "tigerfg_jax.export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUERY_ENCODER = "query_encoder.jax"
ITEM_ENCODER = "item_encoder.jax"
TEXT_QUERY_ENCODER = "text_query_encoder.jax"
QUERY_ENCODERS = (QUERY_ENCODER, TEXT_QUERY_ENCODER)
PREPROCESSING = "preprocessing.json"
TOKENIZER = tokenizer_lib.FILE_NAME
CATALOG = "catalog.jsonl"
INDEX_DIR = "index"
# Rows per encoder call: bounds memory, and padding the last chunk to this size keeps
# the number of compiled batch shapes at two.
EMBED_BATCH = 64
_HASH_CHUNK = 1 << 20


class ExportError(ValueError):
  """An export directory is missing, incomplete, modified or inconsistent."""


# ----------------------------------------------------------------- manifest ---

def file_digest(path: str) -> tuple[str, int]:
  """(sha256 hex digest, size in bytes) of the file at `path`."""
  digest, size = hashlib.sha256(), 0
  with open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
      size += len(chunk)
  return digest.hexdigest(), size


def _export_files(export_dir: str) -> list[str]:
  """Relative paths of every file under `export_dir` but the manifest, sorted.

  Names starting with '.' are skipped: they are temporaries of an interrupted update.
  """
  paths = []
  for parent, dirs, files in os.walk(export_dir):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    for name in files:
      relative = os.path.relpath(os.path.join(parent, name), export_dir)
      if relative != MANIFEST and not name.startswith("."):
        paths.append(relative)
  return sorted(paths)


def write_manifest(export_dir: str, fields: dict[str, Any]) -> dict[str, Any]:
  """Writes `manifest.json`: `fields` plus format, `updated` time and every file's hash.

  Written to a temporary file and renamed, so a reader sees the old or the new one.
  """
  manifest = dict(format=FORMAT, version=FORMAT_VERSION, **fields,
                  updated=datetime.datetime.now(datetime.timezone.utc).isoformat())
  manifest["files"] = {}
  for relative in _export_files(export_dir):
    sha256, size = file_digest(os.path.join(export_dir, relative))
    manifest["files"][relative] = {"sha256": sha256, "size": size}
  tmp = os.path.join(export_dir, f".{MANIFEST}.tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(export_dir, MANIFEST))
  return manifest


def verify(export_dir: str) -> dict[str, Any]:
  """Reads the manifest and checks every file it lists; returns the manifest.

  Raises:
    ExportError naming the first file that is missing, of another size (truncated or
    grown) or of another sha256 (modified), or a manifest that is not an export's.
  """
  path = os.path.join(export_dir, MANIFEST)
  if not os.path.isdir(export_dir):
    raise ExportError(f"{export_dir}: no such export directory (write one with "
                      "`python -m tigerfg_jax.serving.export --workdir=DIR --out=EXPORT`)")
  if not os.path.isfile(path):
    raise ExportError(f"{path}: missing; {export_dir} is not a tigerfg_jax export")
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ExportError(f"{path}: unreadable manifest: {e}") from e
  if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
      or manifest.get("version") != FORMAT_VERSION
      or not isinstance(manifest.get("files"), dict)):
    raise ExportError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION} "
                      "with a 'files' table")
  required = (ITEM_ENCODER, PREPROCESSING, TOKENIZER, CATALOG,
              os.path.join(INDEX_DIR, index_lib.base.MANIFEST))
  for relative in required:
    if relative not in manifest["files"]:
      raise ExportError(f"{path}: does not list {relative}, which every export has")
  if not any(name in manifest["files"] for name in QUERY_ENCODERS):
    raise ExportError(f"{path}: lists no query encoder (one of {QUERY_ENCODERS})")
  for relative, expected in manifest["files"].items():
    full = os.path.join(export_dir, relative)
    if not os.path.isfile(full):
      raise ExportError(f"{full}: missing (listed in {path})")
    size = os.path.getsize(full)
    if size != expected["size"]:
      raise ExportError(f"{full}: {size} bytes, the manifest says {expected['size']}: "
                        "the file is truncated or was modified; re-export the run")
    sha256, _ = file_digest(full)
    if sha256 != expected["sha256"]:
      raise ExportError(f"{full}: sha256 {sha256} differs from the manifest's "
                        f"{expected['sha256']}: the file was modified; re-export the run")
  return manifest


# ------------------------------------------------------------------ catalog ---

def write_catalog(export_dir: str, item_ids: Sequence[str], titles: Sequence[str]) -> None:
  """Writes `catalog.jsonl`: one `{"item_id", "title"}` line per index row."""
  with open(os.path.join(export_dir, CATALOG), "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"item_id": i, "title": t}) + "\n"
                 for i, t in zip(item_ids, titles))


def _read_catalog(export_dir: str) -> tuple[list[str], list[str]]:
  path = os.path.join(export_dir, CATALOG)
  item_ids, titles = [], []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      try:
        row = json.loads(line)
        item_ids.append(str(row["item_id"]))
        titles.append(str(row["title"]))
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{path}:{number}: expected {{\"item_id\", \"title\"}}: {e}") from e
  return item_ids, titles


# ------------------------------------------------------------------- images ---

def load_image(path: str, size: int) -> np.ndarray:
  """The image file at `path` as the evaluator sees it: uint8 `[size, size, 3]`."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise FileNotFoundError(f"{path}: cannot read the image file: {e.strerror}") from e
  try:
    return pipeline.eval_image(data, size)
  except Exception as e:  # Pillow raises many types for bad data.
    raise ValueError(f"{path}: cannot decode the image: {e}") from e


# -------------------------------------------------------------------- model ---

def _load_encoder(path: str) -> jax_export.Exported:
  with open(path, "rb") as f:
    blob = f.read()
  try:
    return jax_export.deserialize(bytearray(blob))
  except Exception as e:  # the flatbuffer reader raises assorted types.
    raise ExportError(f"{path}: not a serialized jax.export module: {e}") from e


def _check_input(name: str, array: Any, dtype: np.dtype, shape: tuple[int | None, ...]
                 ) -> np.ndarray:
  """`array` as `dtype`, checked against `shape` (None: any size)."""
  array = np.asarray(array)
  if array.dtype != dtype:
    raise TypeError(f"{name}: expected dtype {np.dtype(dtype).name}, got {array.dtype}")
  if array.ndim != len(shape) or any(s is not None and s != a
                                     for s, a in zip(shape, array.shape)):
    wanted = "[" + ", ".join("b" if s is None else str(s) for s in shape) + "]"
    raise ValueError(f"{name}: expected shape {wanted}, got {list(array.shape)}")
  return array


def _run_batched(fn: Callable[..., jax.Array], inputs: Sequence[np.ndarray],
                 width: int) -> np.ndarray:
  """`fn(*inputs)` in chunks of EMBED_BATCH rows (last one zero-padded): `[b, width]`."""
  count = len(inputs[0])
  if count == 0:  # the encoders' symbolic batch is >= 1.
    return np.zeros((0, width), np.float32)
  keys = [str(k) for k in range(len(inputs))]
  batches = embedding.array_batches(dict(zip(keys, inputs)), min(count, EMBED_BATCH))
  return embedding.embed_batches(fn, batches, keys, count)


class ExportedModel:
  """An export loaded for serving: the encoders, the tokenizer and the catalog index.

  Attributes:
    export_dir: where it was loaded from (`save_catalog` writes back there).
    manifest: the verified manifest.
    query_image_size, item_image_size, max_title_len, embed_dim: Sq, Si, L, E.
    max_query_len: Lq, text query tokens (0 without a text query encoder).
    query_kinds: the query kinds it answers, from 'image' and 'text'.
    tokenizer: the run's `TitleTokenizer`.
    index: the catalog's `tigerfg_jax.index.Index` (ids are item_id strings).
    item_ids, titles: `[M]` lists in index row order.
  """

  def __init__(self, export_dir: str, manifest: dict[str, Any]):
    self.export_dir = export_dir
    self.manifest = manifest
    with open(os.path.join(export_dir, PREPROCESSING), encoding="utf-8") as f:
      self.preprocessing = json.load(f)
    self.query_image_size = int(self.preprocessing["query_image_size"])
    self.item_image_size = int(self.preprocessing["item_image_size"])
    self.max_title_len = int(self.preprocessing["max_title_len"])
    self.embed_dim = int(self.preprocessing["embed_dim"])
    self.max_query_len = int(self.preprocessing.get("max_query_len", 0))
    self.tokenizer = TitleTokenizer.load(os.path.join(export_dir, TOKENIZER))
    inputs = {
        ITEM_ENCODER: [(self.item_image_size,) * 2 + (3,), (self.max_title_len,),
                       (self.max_title_len,)],
        QUERY_ENCODER: [(self.query_image_size,) * 2 + (3,)],
        TEXT_QUERY_ENCODER: [(self.max_query_len,), (self.max_query_len,)],
    }
    self._fns = {}
    for name, row_shapes in inputs.items():
      if name in manifest["files"]:
        encoder = _load_encoder(os.path.join(export_dir, name))
        self._check_encoder(name, encoder, row_shapes)
        self._fns[name] = jax.jit(encoder.call)
    self.query_kinds = tuple(kind for kind, name in (("image", QUERY_ENCODER),
                                                     ("text", TEXT_QUERY_ENCODER))
                             if name in self._fns)
    self.item_ids, self.titles = _read_catalog(export_dir)
    self.index = index_lib.load(os.path.join(export_dir, INDEX_DIR))
    if list(self.index.ids) != self.item_ids:
      raise ExportError(f"{export_dir}: {CATALOG} and {INDEX_DIR}/ disagree on the "
                        f"item ids ({len(self.item_ids)} vs {self.index.num_items} rows)")

  def _check_encoder(self, name: str, encoder: jax_export.Exported,
                     row_shapes: list[tuple[int, ...]]) -> None:
    """The encoder's inputs `[b, *row_shape]` and output `[b, E]` match preprocessing."""
    shapes = [tuple(aval.shape[1:]) for aval in encoder.in_avals]
    out = [tuple(aval.shape[1:]) for aval in encoder.out_avals]
    if shapes != row_shapes or out != [(self.embed_dim,)]:
      raise ExportError(f"{os.path.join(self.export_dir, name)}: inputs {shapes} -> "
                        f"{out} per row do not match {PREPROCESSING} (expected "
                        f"{row_shapes} -> [({self.embed_dim},)])")

  def _encoder(self, name: str, kind: str) -> Callable[..., jax.Array]:
    if name not in self._fns:
      raise ExportError(f"{self.export_dir} answers {' and '.join(self.query_kinds)} "
                        f"queries, not {kind} queries (it has no {name})")
    return self._fns[name]

  def embed_query(self, images: np.ndarray) -> np.ndarray:
    """uint8 `[b, Sq, Sq, 3]` -> float32 `[b, E]`, L2-normalised."""
    fn = self._encoder(QUERY_ENCODER, "image")
    s = self.query_image_size
    images = _check_input("query images", images, np.uint8, (None, s, s, 3))
    return _run_batched(fn, [images], self.embed_dim)

  def embed_text_queries(self, texts: Sequence[str]) -> np.ndarray:
    """Query strings -> float32 `[b, E]`, tokenized as the run's pipeline does."""
    fn = self._encoder(TEXT_QUERY_ENCODER, "text")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
      raise ValueError(f"text queries: expected non-empty strings, got {list(texts)!r}")
    tokens, mask = self.tokenizer.encode(list(texts), self.max_query_len)
    return _run_batched(fn, [tokens, mask], self.embed_dim)

  def embed_items(self, images: np.ndarray, title_tokens: np.ndarray,
                  title_mask: np.ndarray) -> np.ndarray:
    """uint8 `[b, Si, Si, 3]`, int32 `[b, L]`, bool `[b, L]` -> float32 `[b, E]`."""
    s, length = self.item_image_size, self.max_title_len
    images = _check_input("item images", images, np.uint8, (None, s, s, 3))
    b = len(images)
    title_tokens = _check_input("title tokens", title_tokens, np.int32, (b, length))
    title_mask = _check_input("title mask", title_mask, np.bool_, (b, length))
    return _run_batched(self._fns[ITEM_ENCODER], [images, title_tokens, title_mask],
                        self.embed_dim)

  def encode_titles(self, titles: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(int32 `[b, L]`, bool `[b, L]`) as the run's pipeline tokenizes titles."""
    return self.tokenizer.encode(titles, self.max_title_len)

  def load_images(self, paths: Sequence[str], kind: str) -> np.ndarray:
    """Image files -> uint8 `[b, S, S, 3]` at the `kind` ('query' | 'item') size."""
    sizes = {"query": self.query_image_size, "item": self.item_image_size}
    if kind not in sizes:
      raise ValueError(f"kind={kind!r}: expected one of {list(sizes)}")
    size = sizes[kind]
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    for row, path in enumerate(paths):
      images[row] = load_image(path, size)
    return images

  def search(self, images: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Query images uint8 `[b, Sq, Sq, 3]` -> item ids `[b, k]` str, scores `[b, k]`.

    Best first; positions past the catalog's size hold '' and -inf.
    """
    return self.index.search(self.embed_query(images), k)

  def search_text(self, texts: Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Text queries `[b]` str -> item ids `[b, k]` str, scores `[b, k]` (as `search`)."""
    return self.index.search(self.embed_text_queries(texts), k)

  def check_new_ids(self, item_ids: Sequence[str]) -> None:
    """Raises ValueError naming an id already in the catalog or given twice."""
    known = set(self.item_ids)
    for item_id in item_ids:
      if item_id in known:
        raise ValueError(f"item_id {item_id!r} is already in the catalog of "
                         f"{self.export_dir} (or listed twice)")
      known.add(item_id)

  def add_items(self, item_ids: Sequence[str], titles: Sequence[str],
                embeddings: np.ndarray) -> None:
    """Appends catalog rows: `[N]` ids and titles, float32 `[N, E]` embeddings.

    In memory only; `save_catalog` writes them. Ids are checked by `check_new_ids`.
    """
    if not len(item_ids) == len(titles) == len(embeddings):
      raise ValueError(f"add_items: {len(item_ids)} ids, {len(titles)} titles and "
                       f"{len(embeddings)} embeddings: expected one of each per item")
    self.check_new_ids(item_ids)
    self.index.add(embeddings, np.asarray(list(item_ids), str))
    self.item_ids += list(item_ids)
    self.titles += list(titles)

  def save_catalog(self) -> None:
    """Writes the index and catalog.jsonl back to the export, then a new manifest.

    The new index is written beside the old one and swapped in; if this is
    interrupted, the manifest no longer matches and `load` refuses the export.
    """
    new_index = os.path.join(self.export_dir, f".{INDEX_DIR}-new")
    old_index = os.path.join(self.export_dir, f".{INDEX_DIR}-old")
    for leftover in (new_index, old_index):
      shutil.rmtree(leftover, ignore_errors=True)
    self.index.save(new_index)
    write_catalog(self.export_dir, self.item_ids, self.titles)
    os.rename(os.path.join(self.export_dir, INDEX_DIR), old_index)
    os.rename(new_index, os.path.join(self.export_dir, INDEX_DIR))
    shutil.rmtree(old_index)
    fields = {k: v for k, v in self.manifest.items()
              if k not in ("format", "version", "files", "updated")}
    self.manifest = write_manifest(self.export_dir, fields)


def load(export_dir: str) -> ExportedModel:
  """Loads an export after checking every file against its manifest (see `verify`)."""
  return ExportedModel(export_dir, verify(export_dir))
