"""Validated split -> ArrayRecord shards through tensorflow-datasets, cached.

Each split becomes two tfds datasets written by `GeneratorBasedBuilder`s with
`file_format="array_record"`: `ItemRecords` (row, item_id, title, encoded image bytes,
the file's width and height) and `QueryRecords` (row, query_id, encoded image bytes,
positive item rows, box in the item file's pixels, has_box). Features are raw (bytes
tensors, Text, ints), which tfds writes and reads without TensorFlow. tfds stores
records in a hashed key order, so every record keeps its `row` (its index in the
folder's valid lines) and the cache keeps the row -> record map; `RecordSource` reads by
row.

Cache entry: `<cache_dir>/<split>-<fingerprint>/` (`cache_dir` defaults to
`<root>/.cache`; `data.cache_dir` moves it out of a read-only dataset folder) with
`items/`, `queries/` (tfds data dirs) and `metadata.json` (ids, titles, positives,
boxes, skipped problems, shard sizes, row -> record maps, stored image sizes). The
fingerprint covers the jsonl contents, every file's path, size and mtime under the split
folder, `skip_bad` and the stored image sizes; an entry is built in a temporary folder
and renamed into place, so a reader never sees half an entry.

Images are stored at the size the pipelines read them (`stored_image`): with an item
size S an item image larger than S x S is kept as the lossless PNG of what evaluation
makes of it (`augment.eval_image(file, S)`, squashed to S x S), so training decodes a
small image and evaluation gives the same pixels as from the file; an image that fits in
S x S, or any image when the size is None, keeps the file's bytes. Queries likewise at
their size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator

from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils
from PIL import Image

from tigerfg_jax.data import augment, folder

# Bump when the record layout or metadata change, so old cache entries are not reused.
FORMAT_VERSION = 3
_METADATA = "metadata.json"


class _SplitRecords(tfds.core.GeneratorBasedBuilder):
  """Writes the examples given to the constructor as the single tfds split 'all'."""

  VERSION = tfds.core.Version("1.0.0")
  # tfds looks for a download checksums file next to a builder's module, and for a
  # module inside a package that lookup imports `importlib_resources` (a backport that
  # is not installed on Python >= 3.9). These builders download nothing.
  code_path = None

  def __init__(self, *, examples: Iterator[tuple[int, dict]] | None = None, **kwargs):
    self._examples = examples
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"rows": self._generate_examples()}

  def _generate_examples(self):
    yield from self._examples

  # tfds prints "Downloading and preparing dataset Unknown size ..." and "... downloaded
  # and prepared" to stdout for every table; these builders download nothing.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass


class ItemRecords(_SplitRecords):
  """Item records: `image` holds `stored_image` of the file; width, height the file's."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "row": tfds.features.Scalar(dtype=np.int64),
        "item_id": tfds.features.Text(),
        "title": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "width": tfds.features.Scalar(dtype=np.int64),
        "height": tfds.features.Scalar(dtype=np.int64),
    }))


class QueryRecords(_SplitRecords):
  """Query records: `image` holds `stored_image` of the file; `positives` are item rows;
  `box` is in pixels of the file of item `positives[0]` (0s when no box)."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "row": tfds.features.Scalar(dtype=np.int64),
        "query_id": tfds.features.Text(),
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "positives": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        "has_box": tfds.features.Scalar(dtype=np.bool_),
    }))


_BUILDERS = {"items": ItemRecords, "queries": QueryRecords}


class RecordSource:
  """Random access to one record table by folder row (a Grain data source).

  `source[row]` is a dict of the table's features (`image` as bytes). Read errors
  (a corrupt shard) raise DatasetError naming the shard files.
  """

  def __init__(self, data_dir: str, kind: str, record_of_row: list[int]):
    self._shards = sorted(glob.glob(os.path.join(data_dir, "*", "*", "*.array_record*")))
    try:
      self._source = _BUILDERS[kind](data_dir=data_dir).as_data_source("rows")
    except Exception as e:
      raise folder.DatasetError(f"cannot open the ArrayRecord shards {self._shards}: {e}") from e
    self._record_of_row = record_of_row

  def __len__(self) -> int:
    return len(self._record_of_row)

  def __getitem__(self, row: int) -> dict[str, Any]:
    record = self._record_of_row[row]  # IndexError past the end, so iteration stops.
    try:
      return self._source[record]
    except Exception as e:
      raise folder.DatasetError(
          f"cannot read row {row} from the ArrayRecord shards {self._shards}: {e}; "
          "delete their cache folder to rebuild them") from e


@dataclasses.dataclass(frozen=True)
class Ingested:
  """A split's cache entry: its metadata and the readers of its record tables."""
  directory: str
  metadata: dict[str, Any]

  def source(self, kind: str) -> RecordSource:
    """RecordSource of 'items' or 'queries'."""
    return RecordSource(os.path.join(self.directory, kind), kind,
                        self.metadata["record_of_row"][kind])


def stored_image(data: bytes, size: int | None) -> bytes:
  """The bytes the cache keeps of an image file that pipelines read at `size` x `size`.

  None, or an image that fits in size x size: the file's bytes. A larger image: the PNG
  of `augment.eval_image(data, size)`. PNG is lossless, so evaluation of the stored
  image gives the pixels evaluation of the file gives: `eval_image(stored, size) ==
  eval_image(data, size)` (an S x S PNG is neither drafted nor resized).
  """
  if size is None:
    return data
  with Image.open(io.BytesIO(data)) as image:
    width, height = image.size
  if width <= size and height <= size:
    return data
  out = io.BytesIO()
  Image.fromarray(augment.eval_image(data, size)).save(out, "PNG")
  return out.getvalue()


def fingerprint(split_dir: str, skip_bad: bool, item_size: int | None = None,
                query_size: int | None = None) -> str:
  """Hex digest that changes when anything in the split folder or the sizes change."""
  digest = hashlib.sha256(f"format={FORMAT_VERSION} skip_bad={skip_bad} "
                          f"item_size={item_size} query_size={query_size}".encode())
  for dirpath, dirnames, filenames in os.walk(split_dir):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      stat = os.stat(path)
      relative = os.path.relpath(path, split_dir)
      digest.update(f"{relative}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
      if name in (folder.ITEMS_FILE, folder.QUERIES_FILE, folder.TEXT_QUERIES_FILE):
        with open(path, "rb") as f:
          digest.update(hashlib.sha256(f.read()).digest())
  return digest.hexdigest()[:20]


def _file_bytes(records: folder.SplitRecords, relative: str) -> bytes:
  with open(os.path.join(records.directory, relative), "rb") as f:
    return f.read()


def _item_examples(records: folder.SplitRecords, size: int | None):
  for item in records.items:
    yield item.row, {"row": item.row, "item_id": item.item_id, "title": item.title,
                     "image": stored_image(_file_bytes(records, item.image), size),
                     "width": item.width, "height": item.height}


def _query_examples(records: folder.SplitRecords, size: int | None):
  for query in records.queries:
    yield query.row, {"row": query.row, "query_id": query.query_id,
                      "image": stored_image(_file_bytes(records, query.image), size),
                      "positives": np.asarray(query.positives, np.int64),
                      "box": np.asarray(query.box or (0, 0, 0, 0), np.float32),
                      "has_box": query.box is not None}


@contextlib.contextmanager
def _quiet_tfds():
  """Silences tfds while it writes a table: its INFO lines ("Generating dataset ...")
  and three progress bars per table say nothing a user of a split needs; `ingest` logs
  one line per split instead. Restores absl's verbosity and tfds' progress-bar switch
  (a module global, read there) afterwards."""
  verbosity = absl_logging.get_verbosity()
  bars = tqdm_utils._active  # pylint: disable=protected-access
  absl_logging.set_verbosity(absl_logging.WARNING)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)
    tfds.display_progress_bar(bars)


def _write_table(data_dir: str, kind: str, examples) -> tuple[list[int], dict[str, int]]:
  """Writes one table; returns its row -> record map and {shard path: size}."""
  builder = _BUILDERS[kind](examples=examples, data_dir=data_dir, file_format="array_record")
  with _quiet_tfds():
    builder.download_and_prepare()
  source = builder.as_data_source("rows")
  record_of_row = [0] * len(source)
  for record in range(len(source)):
    record_of_row[int(source[record]["row"])] = record
  shards = {os.path.relpath(path, data_dir): os.path.getsize(path)
            for path in glob.glob(os.path.join(data_dir, "*", "*", "*.array_record*"))}
  return record_of_row, shards


def _build(records: folder.SplitRecords, entry: str, fp: str, item_size: int | None,
           query_size: int | None) -> dict[str, Any]:
  metadata = {
      "format": FORMAT_VERSION, "split": records.name, "fingerprint": fp,
      "item_ids": [i.item_id for i in records.items],
      "titles": [i.title for i in records.items],
      "item_sizes": [[i.width, i.height] for i in records.items],
      "query_ids": [q.query_id for q in records.queries],
      "query_positives": [list(q.positives) for q in records.queries],
      "query_boxes": [list(q.box) if q.box else None for q in records.queries],
      "text_query_ids": [q.query_id for q in records.text_queries],
      "text_queries": [q.text for q in records.text_queries],
      "text_query_positives": [list(q.positives) for q in records.text_queries],
      "skipped": records.skipped, "record_of_row": {}, "shards": {},
      "stored_sizes": {"items": item_size, "queries": query_size},
  }
  for kind, examples in (("items", _item_examples(records, item_size)),
                         ("queries", _query_examples(records, query_size))):
    record_of_row, shards = _write_table(os.path.join(entry, kind), kind, examples)
    metadata["record_of_row"][kind] = record_of_row
    metadata["shards"].update({os.path.join(kind, p): size for p, size in shards.items()})
  return metadata


def _check_shards(entry: str, metadata: dict[str, Any]) -> None:
  for relative, size in metadata["shards"].items():
    path = os.path.join(entry, relative)
    actual = os.path.getsize(path) if os.path.exists(path) else None
    if actual != size:
      raise folder.DatasetError(
          f"{path}: ArrayRecord shard is missing, truncated or changed ({actual} bytes, "
          f"expected {size}); delete {entry} to rebuild it")


def _temporary_entry(cache_dir: str, prefix: str) -> str:
  """A new empty folder in `cache_dir`; DatasetError naming the folder and the config
  key that moves the cache when it cannot be written (e.g. a read-only dataset)."""
  try:
    os.makedirs(cache_dir, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=cache_dir)
  except OSError as e:
    raise folder.DatasetError(
        f"{cache_dir}: cannot write the ArrayRecord cache there ({e.strerror}); pass "
        "--config.data.cache_dir=A_WRITABLE_FOLDER to keep it elsewhere") from e


def ingest(root: str, split: str, *, cache_dir: str | None = None,
           skip_bad: bool = False, item_size: int | None = None,
           query_size: int | None = None) -> Ingested:
  """Validates `root/split` and writes its shards, or reuses the cached ones.

  `cache_dir` None: `<root>/.cache`. `item_size` / `query_size`: the side the
  pipelines read item / query images at (`stored_image`); None keeps the files' bytes.
  Raises DatasetError for invalid data (unless `skip_bad`), for damaged shards and for
  a cache folder that cannot be written.
  """
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise folder.DatasetError(f"{split_dir}: split folder does not exist")
  cache_dir = os.path.join(root, ".cache") if cache_dir is None else cache_dir
  for name, size in (("item_size", item_size), ("query_size", query_size)):
    if size is not None and size < 1:
      raise ValueError(f"ingest {split_dir}: {name}={size}; expected a positive side or None")
  fp = fingerprint(split_dir, skip_bad, item_size, query_size)
  entry = os.path.join(cache_dir, f"{split}-{fp}")
  cached = os.path.exists(os.path.join(entry, _METADATA))
  if not cached:
    records = folder.read_split(root, split, skip_bad=skip_bad)
    tmp = _temporary_entry(cache_dir, f".{split}-{fp}-")
    try:
      metadata = _build(records, tmp, fp, item_size, query_size)
      with open(os.path.join(tmp, _METADATA), "w", encoding="utf-8") as f:
        json.dump(metadata, f)
      try:
        os.rename(tmp, entry)
        logging.info("ingested %s into %s", split_dir, entry)
      except OSError:
        if not os.path.exists(os.path.join(entry, _METADATA)):
          raise
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  with open(os.path.join(entry, _METADATA), encoding="utf-8") as f:
    metadata = json.load(f)
  if cached and metadata["skipped"]:
    logging.warning("%s: %d bad record(s) skipped:\n  %s", split_dir,
                    len(metadata["skipped"]), folder.summarize(metadata["skipped"]))
  _check_shards(entry, metadata)
  return Ingested(entry, metadata)
