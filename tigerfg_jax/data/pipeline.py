"""Grain input pipelines over the ingested ArrayRecord splits.

Training (`train_iterator`): query records -> global shuffle (seed, reshuffled every
epoch) -> repeat -> this process's slice (elements p, p + P, ...: disjoint across
processes and, together, the global stream) -> batches of `batch_size // P` records ->
one `random_map` that builds the batch dict of docs/ARCHITECTURE.md. In each batch a
random number of Mosaic groups (expected fraction `mosaic_prob` of the examples) come
first: grid^2 consecutive examples share one mosaic of their item images, each with its
tile's title, box and spatial target; the rest use their item image alone. A mosaic
example always has a box: its item's box moved into its tile, or the whole tile when
the item's box is unknown (the item fills its tile).

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
from typing import Any, Sequence

import grain
import numpy as np

from tigerfg_jax.data import augment, folder, ingest, spatial, tokenizer as tokenizer_lib

# Batches built concurrently in each process: PIL releases the GIL while decoding and
# resizing, so a few threads help; more only hold more batches in memory.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class Split:
  """One ingested split: ids and titles in folder order, and row-indexed sources.

  `items[row]` / `queries[row]` read the ArrayRecord rows (dicts with encoded `image`
  bytes). `query_positives[q]` are item rows; `query_boxes[q]` is in pixels of the
  image of item `query_positives[q][0]` (or None). `item_groups` int32 [num_items].
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
               skip_bad: bool = False) -> Split:
  """Validates and ingests `root/split` (or reuses its cache entry) and opens it.

  `cache_dir` None: `<root>/.cache` (config key `data.cache_dir`).
  """
  entry = ingest.ingest(root, split, cache_dir=cache_dir, skip_bad=skip_bad)
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
  )


def load_splits(root: str, *, cache_dir: str | None = None,
                skip_bad: bool = False) -> dict[str, Split]:
  """`load_split` of every split of `root` ('train', then the eval splits), by name.

  Raises one DatasetError with the problems of every bad split, not only the first.
  """
  return folder.collect_errors(
      root, folder.split_names(root),
      lambda name: load_split(root, name, cache_dir=cache_dir, skip_bad=skip_bad))


@dataclasses.dataclass(frozen=True)
class _TrainBatch:
  """Builds one training batch from a list of query records (a grain random_map)."""
  items: ingest.RecordSource
  item_sizes: np.ndarray
  item_groups: np.ndarray
  title_tokens: np.ndarray
  title_mask: np.ndarray
  item_size: int
  query_size: int
  grid: int
  mosaic_prob: float
  mosaic_grid: int

  def _num_mosaics(self, batch: int, rng: np.random.Generator) -> int:
    """Mosaics in this batch; on average mosaic_prob * batch examples are in one."""
    tiles = self.mosaic_grid ** 2
    expected = self.mosaic_prob * batch / tiles
    count = math.floor(expected) + int(rng.random() < expected - math.floor(expected))
    return min(count, batch // tiles)

  def __call__(self, queries: list[dict[str, Any]],
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    b, size = len(queries), self.item_size
    item_rows = np.empty(b, np.int64)
    boxes = np.zeros((b, 4), np.float32)
    has_box = np.zeros(b, bool)
    for e, query in enumerate(queries):
      pick = int(rng.integers(len(query["positives"])))
      item_rows[e] = query["positives"][pick]
      if pick == 0 and query["has_box"]:
        boxes[e] = spatial.normalize_box(query["box"], *self.item_sizes[item_rows[e]])
        has_box[e] = True
    item_image = np.empty((b, size, size, 3), np.uint8)
    tiles = self.mosaic_grid ** 2
    num_mosaic_examples = self._num_mosaics(b, rng) * tiles
    rects = augment.mosaic_tiles(size, self.mosaic_grid)
    for start in range(0, num_mosaic_examples, tiles):
      group = range(start, start + tiles)
      images = [folder.decode_rgb(self.items[int(item_rows[e])]["image"], size // self.mosaic_grid)
                for e in group]
      item_image[start:start + tiles] = augment.mosaic(images, size, self.mosaic_grid)
      for tile, e in enumerate(group):
        boxes[e] = augment.box_in_tile(boxes[e] if has_box[e] else None, rects[tile], size)
        has_box[e] = True
    for e in range(num_mosaic_examples, b):
      image = folder.decode_rgb(self.items[int(item_rows[e])]["image"], size)
      item_image[e] = augment.resize(image, size, size)
    query_image = np.stack([
        augment.augment_query(folder.decode_rgb(q["image"], self.query_size), rng, self.query_size)
        for q in queries])
    return {
        "query_image": query_image,
        "item_image": item_image,
        "title_tokens": self.title_tokens[item_rows],
        "title_mask": self.title_mask[item_rows],
        "box": boxes,
        "has_box": has_box,
        "spatial_target": spatial.patch_targets(boxes, has_box, self.grid),
        "group": self.item_groups[item_rows],
    }


def train_iterator(split: Split, tokenizer: tokenizer_lib.TitleTokenizer, data_config, *,
                   batch_size: int, patch_size: int, max_title_len: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless iterator of this process's training batches (`batch_size // process_count`).

  Deterministic given `seed` (and the process index). The returned grain iterator has
  `get_state()` (a JSON-serialisable dict) and `set_state(state)` for exact resume;
  the state depends on `data_config.worker_count`, which must not change on resume.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by {process_count} processes")
  if not 0.0 <= data_config.mosaic_prob <= 1.0 or data_config.mosaic_grid < 1:
    raise ValueError(f"need 0 <= data.mosaic_prob <= 1 and data.mosaic_grid >= 1, got "
                     f"{data_config.mosaic_prob}, {data_config.mosaic_grid}")
  tokens, mask = tokenizer.encode(split.titles, max_title_len)
  build = _TrainBatch(
      items=split.items, item_sizes=split.item_sizes, item_groups=split.item_groups,
      title_tokens=tokens, title_mask=mask, item_size=data_config.item_image_size,
      query_size=data_config.query_image_size,
      grid=spatial.grid_size(data_config.item_image_size, patch_size),
      mosaic_prob=data_config.mosaic_prob, mosaic_grid=data_config.mosaic_grid)
  # One global order for all processes; augmentation seeds differ per process.
  augment_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
  dataset = (grain.MapDataset.source(split.queries)
             .shuffle(seed=seed)
             .repeat()[process_index::process_count]
             .batch(batch_size // process_count, drop_remainder=True, batch_fn=list)
             .random_map(build, seed=augment_seed)
             .to_iter_dataset(_READ_OPTIONS))
  if data_config.worker_count > 0:
    dataset = dataset.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.worker_count))
  return iter(dataset)


def _padded(rows: list[dict[str, Any]], batch_size: int) -> dict[str, np.ndarray]:
  valid = np.zeros(batch_size, bool)
  valid[:len(rows)] = True
  index = np.full(batch_size, -1, np.int32)
  index[:len(rows)] = [int(r["row"]) for r in rows]
  return {"valid": valid, "index": index}


def eval_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 `[size, size, 3]` as evaluation and search see them."""
  return augment.resize(folder.decode_rgb(data, size), size, size)


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
  tokens, mask = tokenizer.encode(split.titles, max_title_len)
  return (grain.MapDataset.source(split.items)
          .batch(batch_size, batch_fn=list)
          .map(_EvalItemBatch(tokens, mask, data_config.item_image_size, batch_size))
          .to_iter_dataset(_READ_OPTIONS))


def eval_query_batches(split: Split, data_config, *, batch_size: int) -> grain.IterDataset:
  """The split's queries in row order: dicts with `query_image` uint8 [B, Sq, Sq, 3],
  `valid` bool [B], `index` int32 [B]. Re-iterable; ceil(num_queries / batch_size)."""
  return (grain.MapDataset.source(split.queries)
          .batch(batch_size, batch_fn=list)
          .map(_EvalQueryBatch(data_config.query_image_size, batch_size))
          .to_iter_dataset(_READ_OPTIONS))
