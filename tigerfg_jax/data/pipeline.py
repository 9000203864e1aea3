"""Grain input pipelines over the ingested ArrayRecord splits.

Training (`train_iterator`): query records -> global shuffle (seed, reshuffled every
epoch) -> repeat -> this process's slice (elements p, p + P, ...: disjoint across
processes and, together, the global stream) -> units of M = `data.mosaic_max_products`
consecutive records (`_BatchUnits`: each batch of `batch_size // P` records cut into
units) -> a per-unit `random_map` building the unit's examples (in Grain worker processes
when `data.worker_count` != 0; queries are flipped and jittered here unless
`data.device_augment`, when the train step does it) -> the units of a batch concatenated
into the batch dict of docs/ARCHITECTURE.md.

Mosaic (tigerfg_jax/data/mosaic.py): the first units of each batch, a random number of
them whose expectation puts a fraction `mosaic_prob` of the examples on a canvas, are
Mosaic units. A Mosaic unit's examples are cut into canvases of 2..M consecutive examples
(`mosaic.partition`: 1..M-1 distractors each, drawn at random; a last single example is
built normally). On a canvas each example's product (its box region of the item image,
or the whole image without a box) is pasted with the others' onto a random background;
every example of the canvas has the canvas as its item image, its own title, and as box
(`has_box` True) and spatial target where its product was pasted. A product whose group
or title tokens equal those of a product already on its canvas is left out and its
example built normally (two listings of one product are not negatives of each other);
a canvas left with one product is dropped the same way. Other examples: the item image
resized (`augment.eval_image`), with the query's box.

Privileged teacher input (`target_crops=True`): `target_image` uint8 [B, Si, Si, 3] is
the example's target: the square context region of its box (`augment.context_box`: the
box's longer side plus 10% a side, in the item file's pixels, so the product keeps its
aspect) cut from the decoded stored item image (the best resolution the pipeline has)
and resized to Si x Si; without a box, the item image; on a canvas, the product's
source region (not what covers it on the canvas). `target_crops=False`: no key, no work.

An example is one query: its item is one of its positives drawn at random; its box is
known when that item is `item_ids[0]` (the box's reference image) and the query has a
box. `group` labels the connected components of the "listed together as positives"
relation, so with one-to-many queries all items of a product share a group.

Evaluation (`eval_item_batches`, `eval_query_batches`): the split in folder order, no
augmentation, the last batch padded (`valid` False, `index` -1 on padding rows).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

import grain
import numpy as np

from tigerfg_jax.data import augment, folder, ingest, mosaic, spatial
from tigerfg_jax.data import text_queries as text_queries_lib
from tigerfg_jax.data import tokenizer as tokenizer_lib

# Evaluation batches built concurrently: PIL releases the GIL while decoding and
# resizing, so a few threads help; more only hold more batches in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)
# Re-exported: exported.py and box_oracle.py preprocess images with it.
eval_image = augment.eval_image


@dataclasses.dataclass(frozen=True)
class Split:
  """One ingested split: ids and titles in folder order, and row-indexed sources.

  `items[row]` / `queries[row]` read the ArrayRecord rows (dicts with encoded `image`
  bytes, stored at `item_store_size` / `query_store_size` when not None: see
  `ingest.stored_image`). `item_sizes` int64 [num_items, 2] are the item files' width,
  height; `query_positives[q]` are item rows; `query_boxes[q]` is in pixels of the file
  of item `query_positives[q][0]` (or None). `item_groups` int32 [num_items].
  `text_queries[t]` (texts; empty without text_queries.jsonl) are relevant to the item
  rows `text_query_positives[t]`.
  """
  name: str
  item_ids: list[str]
  titles: list[str]
  item_sizes: np.ndarray
  query_ids: list[str]
  query_positives: list[list[int]]
  query_boxes: list[list[float] | None]
  item_groups: np.ndarray
  items: ingest.RecordSource
  queries: ingest.RecordSource
  skipped: list[str]
  item_store_size: int | None = None
  query_store_size: int | None = None
  text_query_ids: list[str] = dataclasses.field(default_factory=list)
  text_queries: list[str] = dataclasses.field(default_factory=list)
  text_query_positives: list[list[int]] = dataclasses.field(default_factory=list)

  @property
  def num_items(self) -> int:
    return len(self.item_ids)

  @property
  def num_queries(self) -> int:
    return len(self.query_ids)


def positive_groups(num_items: int, query_positives: Sequence[Sequence[int]]) -> np.ndarray:
  """int32 [num_items]: component of each item when a query's positives are linked.

  Components are numbered in order of their first item row.
  """
  parent = list(range(num_items))

  def find(i: int) -> int:
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for positives in query_positives:
    for other in positives[1:]:
      parent[find(other)] = find(positives[0])
  label: dict[int, int] = {}
  return np.asarray([label.setdefault(find(i), len(label)) for i in range(num_items)], np.int32)


def load_split(root: str, split: str, *, cache_dir: str | None = None,
               skip_bad: bool = False, item_size: int | None = None,
               query_size: int | None = None) -> Split:
  """Validates and ingests `root/split` (or reuses its cache entry) and opens it.

  `cache_dir` None: `<root>/.cache` (config key `data.cache_dir`). `item_size` /
  `query_size`: store images at the sides the pipelines read (`data.item_image_size` /
  `data.query_image_size`; see `ingest.stored_image`), so training decodes small
  images; None keeps the files' bytes (full-size figures).
  """
  entry = ingest.ingest(root, split, cache_dir=cache_dir, skip_bad=skip_bad,
                        item_size=item_size, query_size=query_size)
  meta = entry.metadata
  return Split(
      name=split,
      item_ids=meta["item_ids"],
      titles=meta["titles"],
      item_sizes=np.asarray(meta["item_sizes"], np.int64).reshape(-1, 2),
      query_ids=meta["query_ids"],
      query_positives=meta["query_positives"],
      query_boxes=meta["query_boxes"],
      item_groups=positive_groups(len(meta["item_ids"]), meta["query_positives"]),
      items=entry.source("items"),
      queries=entry.source("queries"),
      skipped=meta["skipped"],
      item_store_size=meta["stored_sizes"]["items"],
      query_store_size=meta["stored_sizes"]["queries"],
      text_query_ids=meta["text_query_ids"],
      text_queries=meta["text_queries"],
      text_query_positives=meta["text_query_positives"],
  )


def load_splits(root: str, *, cache_dir: str | None = None, skip_bad: bool = False,
                item_size: int | None = None,
                query_size: int | None = None) -> dict[str, Split]:
  """`load_split` of every split of `root` ('train', then the eval splits), by name.

  Raises one DatasetError with the problems of every bad split, not only the first.
  """
  return folder.collect_errors(
      root, folder.split_names(root),
      lambda name: load_split(root, name, cache_dir=cache_dir, skip_bad=skip_bad,
                              item_size=item_size, query_size=query_size))


def _check_stored_sizes(split: Split, data_config) -> None:
  """Images stored at one size and read at another would be resized twice."""
  for stored, key in ((split.item_store_size, "item_image_size"),
                      (split.query_store_size, "query_image_size")):
    if stored is not None and stored != data_config[key]:
      raise ValueError(f"split {split.name!r} stores images at {stored} px but "
                       f"data.{key}={data_config[key]}: load it with the config's sizes")


def _units_per_batch(batch_size: int, unit_size: int) -> int:
  return -(-batch_size // unit_size)


class _BatchUnits(grain.MapDataset):
  """Element k: `(k, records)`: unit k % U of batch k // U of the `parent` records.

  Batch b is the records `b * batch_size ...`; it is cut into U = ceil(batch_size /
  unit_size) units of `unit_size` consecutive records (the last one shorter when
  unit_size does not divide the batch). A unit is built by one map call, so a Mosaic
  canvas never spans two calls, and the batch is the concatenation of its U units.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, unit_size: int):
    super().__init__(parent)
    self._batch_size, self._unit_size = batch_size, unit_size
    self.units_per_batch = _units_per_batch(batch_size, unit_size)

  def __len__(self) -> int:
    return len(self._parent) // self._batch_size * self.units_per_batch

  def __str__(self) -> str:
    return f"_BatchUnits(batch_size={self._batch_size}, unit_size={self._unit_size})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, unit = divmod(index, self.units_per_batch)
    start = batch * self._batch_size + unit * self._unit_size
    stop = min(start + self._unit_size, (batch + 1) * self._batch_size)
    return index, [self._parent[i] for i in range(start, stop)]


@dataclasses.dataclass(frozen=True)
class _TrainUnit:
  """Builds the examples of one unit `(k, query records)` (a grain random_map).

  Units `0 .. m - 1` of a batch are Mosaic units, where m (`num_mosaics`) depends only
  on the batch index and `layout_seed`, so every unit of a batch agrees on it.
  """
  items: ingest.RecordSource
  item_sizes: np.ndarray
  item_groups: np.ndarray
  title_tokens: np.ndarray
  title_mask: np.ndarray
  item_size: int
  query_size: int
  grid: int
  mosaic_prob: float
  max_products: int
  flip_and_jitter: bool
  target_crops: bool
  batch_size: int
  layout_seed: int
  text: text_queries_lib.TextQueryTable | None = None

  def num_mosaics(self, batch_index: int) -> int:
    """Mosaic units in batch `batch_index`; on average they put mosaic_prob *
    batch_size examples on canvases (at most every full unit is one)."""
    rng = np.random.default_rng([self.layout_seed, batch_index])
    per_unit = mosaic.expected_on_canvases(self.max_products, self.max_products)
    expected = self.mosaic_prob * self.batch_size / per_unit
    count = math.floor(expected) + int(rng.random() < expected - math.floor(expected))
    return min(count, self.batch_size // self.max_products)

  def _canvases(self, item_rows: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """The unit's canvases (example indices), without products of a group or title
    already on the canvas; canvases of fewer than 2 products are dropped."""
    canvases = []
    for members in mosaic.partition(len(item_rows), self.max_products, rng):
      kept: list[int] = []
      for e in members:
        row = item_rows[e]
        if all(self.item_groups[row] != self.item_groups[item_rows[k]]
               and not np.array_equal(self.title_tokens[row], self.title_tokens[item_rows[k]])
               for k in kept):
          kept.append(e)
      if len(kept) >= 2:
        canvases.append(kept)
    return canvases

  def _target(self, image, box: np.ndarray, row: int) -> np.ndarray:
    """uint8 [Si, Si, 3]: the square context region of the item's box (`context_box`,
    in the item file's pixels) resized to the item size."""
    region = augment.context_box(box, *self.item_sizes[row])
    return augment.crop_resize(image, region, self.item_size, self.item_size)

  def _plain(self, data: bytes, box: np.ndarray | None,
             row: int) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 [Si, Si, 3] item image and target image (None unless target_crops)."""
    image = augment.eval_image(data, self.item_size)
    if not self.target_crops:
      return image, None
    if box is None:
      return image, image
    return image, self._target(folder.decode_rgb(data), box, row)

  def _canvas(self, data: list[bytes], boxes: list[np.ndarray | None], item_rows: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One canvas of the products of `data` (item rows `item_rows`, boxes or None): the
    canvas uint8 [Si, Si, 3], the pasted boxes float32 [n, 4] and target images uint8
    [n, Si, Si, 3] (None unless target_crops)."""
    products = []
    for encoded, box, row in zip(data, boxes, item_rows):
      image = folder.decode_rgb(encoded)
      products.append(mosaic.Product(image, box,
                                     mosaic.product_aspect(box, *self.item_sizes[row])))
    canvas, pasted = mosaic.compose(products, self.item_size, rng)
    if not self.target_crops:
      return canvas, pasted, None
    return canvas, pasted, np.stack([
        augment.crop_resize(p.image, None, self.item_size, self.item_size) if p.box is None
        else self._target(p.image, p.box, int(row)) for p, row in zip(products, item_rows)])

  def _positives(self, queries: list[dict[str, Any]], rng: np.random.Generator
                 ) -> tuple[np.ndarray, list[np.ndarray | None]]:
    """Each query's item row (a positive drawn at random) and normalised box (None unless
    the item is the box's image `positives[0]` and the query has a box)."""
    item_rows = np.empty(len(queries), np.int64)
    boxes: list[np.ndarray | None] = []
    for e, query in enumerate(queries):
      pick = int(rng.integers(len(query["positives"])))
      item_rows[e] = query["positives"][pick]
      known = pick == 0 and query["has_box"]
      boxes.append(spatial.normalize_box(query["box"], *self.item_sizes[item_rows[e]])
                   if known else None)
    return item_rows, boxes

  def __call__(self, unit: tuple[int, list[dict[str, Any]]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    index, queries = unit
    batch_index, position = divmod(index, _units_per_batch(self.batch_size, self.max_products))
    n, size = len(queries), self.item_size
    item_rows, boxes = self._positives(queries, rng)
    data = [self.items[int(r)]["image"] for r in item_rows]
    item_image = np.empty((n, size, size, 3), np.uint8)
    target_image = np.empty_like(item_image) if self.target_crops else None
    canvases = (self._canvases(item_rows, rng)
                if position < self.num_mosaics(batch_index) else [])
    on_canvas = {e for members in canvases for e in members}
    for e in sorted(set(range(n)) - on_canvas):
      item_image[e], target = self._plain(data[e], boxes[e], int(item_rows[e]))
      if target is not None:
        target_image[e] = target
    for members in canvases:
      canvas, pasted, targets = self._canvas(
          [data[e] for e in members], [boxes[e] for e in members], item_rows[members], rng)
      item_image[members] = canvas
      for e, box in zip(members, pasted):
        boxes[e] = box
      if targets is not None:
        target_image[members] = targets
    has_box = np.asarray([b is not None for b in boxes])
    box_array = np.stack([np.zeros(4, np.float32) if b is None else b for b in boxes])
    query_image = np.stack([
        augment.augment_query(folder.decode_rgb(q["image"], self.query_size), rng,
                              self.query_size, self.flip_and_jitter)
        for q in queries])
    batch = {
        "query_image": query_image,
        "item_image": item_image,
        "title_tokens": self.title_tokens[item_rows],
        "title_mask": self.title_mask[item_rows],
        "box": box_array.astype(np.float32),
        "has_box": has_box,
        "spatial_target": spatial.patch_targets(box_array, has_box, self.grid),
        "group": self.item_groups[item_rows],
    }
    if target_image is not None:
      batch["target_image"] = target_image
    if self.text is not None:
      batch.update(self.text.sample(item_rows, rng))
    return batch


def _concatenate(units: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {key: np.concatenate([u[key] for u in units]) for key in units[0]}


def worker_count(configured: int) -> int:
  """Grain worker processes for `data.worker_count`: itself when >= 0; -1 = the cores
  this process may use, less 2 (the training loop and the device transfers), at least 1."""
  if configured >= 0:
    return configured
  if configured != -1:
    raise ValueError(f"data.worker_count={configured}: expected -1 (from the cores) or >= 0")
  return max(1, len(os.sched_getaffinity(0)) - 2)


class TrainIterator:
  """Endless iterator of training batches whose state is the number of batches taken.

  `get_state()` is `{"next_index": batches returned}` (JSON), the same for every worker
  count, so a run may resume on a machine with another number of cores; `set_state`
  restarts the Grain pipeline at that batch. `close()` stops the worker processes.
  """

  def __init__(self, units: grain.MapDataset, units_per_batch: int, workers: int):
    self._units, self._units_per_batch, self._workers = units, units_per_batch, workers
    self._next_index = 0
    self._iterator = None

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._start(self._next_index)
    batch = next(self._iterator)
    self._next_index += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"next_index": self._next_index}

  def set_state(self, state: dict[str, Any]) -> None:
    index = state.get("next_index") if isinstance(state, dict) else None
    if not isinstance(index, int) or index < 0 or set(state) != {"next_index"}:
      raise ValueError(f"train iterator state {state!r}: expected {{'next_index': batches "
                       "taken}, as get_state() returns")
    self.close()
    self._next_index = index

  def close(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
    self._iterator = None

  def _start(self, batch_index: int) -> grain.DatasetIterator:
    u = self._units_per_batch
    units = self._units[batch_index * u:]
    if not self._workers:
      # PIL releases the GIL while decoding and resizing, so two threads help.
      dataset = units.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=u))
    else:
      # Units leave the workers in order (grain interleaves them by index), so the
      # batches are the in-process ones.
      share = -(-u // self._workers)
      dataset = units.to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=share)).mp_prefetch(
              grain.MultiprocessingOptions(num_workers=self._workers,
                                           per_worker_buffer_size=share))
    return iter(dataset.batch(u, drop_remainder=True, batch_fn=_concatenate))


def train_units(split: Split, tokenizer: tokenizer_lib.TitleTokenizer, data_config, *,
                batch_size: int, patch_size: int, max_title_len: int, seed: int,
                process_index: int = 0, process_count: int = 1,
                target_crops: bool = False, text_queries: bool = False,
                max_query_len: int = 0) -> tuple[grain.MapDataset, int]:
  """This process's training units and how many make a batch.

  Units: a random-access grain MapDataset of dicts with the batch keys of
  docs/ARCHITECTURE.md (`target_image` only with `target_crops`; the text-query keys of
  `text_queries.TextQueryTable.sample` only with `text_queries`) and a leading dimension
  of at most `data.mosaic_max_products` examples; U consecutive units (from a multiple
  of U) make a batch of `batch_size // process_count`. A unit is what a worker builds in
  one call.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  if not 0.0 <= data_config.mosaic_prob <= 1.0 or data_config.mosaic_max_products < 2:
    raise ValueError(f"need 0 <= data.mosaic_prob <= 1 and data.mosaic_max_products >= 2, "
                     f"got {data_config.mosaic_prob}, {data_config.mosaic_max_products}")
  _check_stored_sizes(split, data_config)
  local_batch = batch_size // process_count
  tokens, mask = tokenizer.encode(split.titles, max_title_len)
  # One global order for all processes; augmentation seeds differ per process.
  augment_seed, layout_seed = np.random.SeedSequence([seed, process_index]).generate_state(2)
  build = _TrainUnit(
      items=split.items, item_sizes=split.item_sizes, item_groups=split.item_groups,
      title_tokens=tokens, title_mask=mask, item_size=data_config.item_image_size,
      query_size=data_config.query_image_size,
      grid=spatial.grid_size(data_config.item_image_size, patch_size),
      mosaic_prob=data_config.mosaic_prob, max_products=data_config.mosaic_max_products,
      flip_and_jitter=not data_config.device_augment, target_crops=target_crops,
      batch_size=local_batch, layout_seed=int(layout_seed),
      text=text_queries_lib.TextQueryTable.build(
          split.text_queries, split.text_query_positives, split.num_items, tokenizer,
          max_query_len) if text_queries else None)
  records = (grain.MapDataset.source(split.queries)
             .shuffle(seed=seed)
             .repeat()[process_index::process_count])
  units = _BatchUnits(records, local_batch, data_config.mosaic_max_products)
  return units.random_map(build, seed=int(augment_seed)), units.units_per_batch


def train_iterator(split: Split, tokenizer: tokenizer_lib.TitleTokenizer, data_config, *,
                   batch_size: int, patch_size: int, max_title_len: int, seed: int,
                   process_index: int = 0, process_count: int = 1,
                   target_crops: bool = False, text_queries: bool = False,
                   max_query_len: int = 0) -> TrainIterator:
  """Endless iterator of this process's training batches (`batch_size // process_count`).

  `target_crops`: add `target_image` (the privileged teacher's input; module docstring).
  `text_queries`: add a text query per example, `max_query_len` tokens
  (`data/text_queries.py`).
  Deterministic given `seed` (and the process index), whatever `data.worker_count`:
  units are built per example group in `worker_count(data.worker_count)` Grain worker
  processes (0: threads of this process) and batched here. See `TrainIterator` for the
  resumable state.
  """
  units, units_per_batch = train_units(
      split, tokenizer, data_config, batch_size=batch_size, patch_size=patch_size,
      max_title_len=max_title_len, seed=seed, process_index=process_index,
      process_count=process_count, target_crops=target_crops, text_queries=text_queries,
      max_query_len=max_query_len)
  return TrainIterator(units, units_per_batch, worker_count(data_config.worker_count))


def _padded(rows: list[dict[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
  valid = np.zeros(batch_size, bool)
  valid[:len(rows)] = True
  index = np.full(batch_size, -1, np.int32)
  index[:len(rows)] = [int(r["row"]) for r in rows]
  return {"valid": valid, "index": index}


def _eval_images(rows: list[dict[str, Any]], batch_size: int, size: int) -> np.ndarray:
  """uint8 `[batch_size, size, size, 3]`: the rows' images, then zero padding."""
  images = np.zeros((batch_size, size, size, 3), np.uint8)
  for e, row in enumerate(rows):
    images[e] = eval_image(row["image"], size)
  return images


@dataclasses.dataclass(frozen=True)
class _EvalItemBatch:
  title_tokens: np.ndarray
  title_mask: np.ndarray
  size: int
  batch_size: int

  def __call__(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = _padded(rows, self.batch_size)
    index = np.maximum(batch["index"], 0)
    batch.update(item_image=_eval_images(rows, self.batch_size, self.size),
                 title_tokens=np.where(batch["valid"][:, None], self.title_tokens[index], 0),
                 title_mask=self.title_mask[index] & batch["valid"][:, None])
    return batch


@dataclasses.dataclass(frozen=True)
class _EvalQueryBatch:
  size: int
  batch_size: int

  def __call__(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = _padded(rows, self.batch_size)
    batch["query_image"] = _eval_images(rows, self.batch_size, self.size)
    return batch


def eval_item_batches(split: Split, tokenizer: tokenizer_lib.TitleTokenizer, data_config, *,
                      batch_size: int, max_title_len: int) -> grain.IterDataset:
  """The split's items in row order: dicts with `item_image` uint8 [B, Si, Si, 3],
  `title_tokens` int32 [B, L], `title_mask` bool [B, L], `valid` bool [B], `index`
  int32 [B]. Re-iterable; ceil(num_items / batch_size) batches."""
  _check_stored_sizes(split, data_config)
  tokens, mask = tokenizer.encode(split.titles, max_title_len)
  return (grain.MapDataset.source(split.items)
          .batch(batch_size, batch_fn=list)
          .map(_EvalItemBatch(tokens, mask, data_config.item_image_size, batch_size))
          .to_iter_dataset(_READ_OPTIONS))


def eval_query_batches(split: Split, data_config, *, batch_size: int) -> grain.IterDataset:
  """The split's queries in row order: dicts with `query_image` uint8 [B, Sq, Sq, 3],
  `valid` bool [B], `index` int32 [B]. Re-iterable; ceil(num_queries / batch_size)."""
  _check_stored_sizes(split, data_config)
  return (grain.MapDataset.source(split.queries)
          .batch(batch_size, batch_fn=list)
          .map(_EvalQueryBatch(data_config.query_image_size, batch_size))
          .to_iter_dataset(_READ_OPTIONS))


@dataclasses.dataclass(frozen=True)
class _EvalTextBatch:
  tokens: np.ndarray
  mask: np.ndarray
  batch_size: int

  def __call__(self, rows: list[int]) -> dict[str, np.ndarray]:
    batch = _padded([{"row": r} for r in rows], self.batch_size)
    index = np.maximum(batch["index"], 0)
    batch.update(text_tokens=np.where(batch["valid"][:, None], self.tokens[index], 0),
                 text_mask=self.mask[index] & batch["valid"][:, None])
    return batch


def eval_text_query_batches(split: Split, tokenizer: tokenizer_lib.TitleTokenizer, *,
                            batch_size: int, max_query_len: int) -> grain.IterDataset:
  """The split's text queries in file order: dicts with `text_tokens` int32 [B, Lq],
  `text_mask` bool [B, Lq], `valid` bool [B], `index` int32 [B]. Re-iterable."""
  tokens, mask = tokenizer.encode(split.text_queries, max_query_len)
  return (grain.MapDataset.range(len(split.text_queries))
          .batch(batch_size, batch_fn=list)
          .map(_EvalTextBatch(tokens.astype(np.int32), mask, batch_size))
          .to_iter_dataset(_READ_OPTIONS))
