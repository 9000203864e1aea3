"""Input pipeline throughput per worker at 224 px: one table.

  python benchmarks/input_pipeline.py [--size=224 --items=64 --batch=32 --seconds=2]

Writes a small synthetic catalog (`--items` train items, PNG items, JPEG queries at
`--size` px) to a temporary folder, ingests it, then times each stage in one thread
of this process (what one Grain worker does per image):
  read          one ArrayRecord row, no decoding: the baseline of the ratios.
  item          read + decode + resize to size x size (an original training item).
  mosaic        read + decode 4 items + 2x2 mosaic, per item image.
  query         read + decode + random resized crop, flip, colour jitter.
  photo jpeg    a 640x480 JPEG photo decoded and resized, with and without the JPEG
                draft (reduced-scale decoding) the pipeline uses.
  train batch   the whole training batch builder (mosaic_prob 0.5), per example.
  grain         `train_iterator` end to end (2 reader threads), per example.
Rates are images (or examples) per second; ratios are against `read` in the same run.
"""

from __future__ import annotations

import io
import shutil
import tempfile
import time
from typing import Callable

import numpy as np
from absl import app, flags
from PIL import Image

from tigerfg_jax import config_lib
from tigerfg_jax.data import augment, folder, pipeline, synthetic
from tigerfg_jax.data.tokenizer import TitleTokenizer

_SIZE = flags.DEFINE_integer("size", 224, "Item and query image side in pixels.")
_ITEMS = flags.DEFINE_integer("items", 64, "Items of the synthetic train split.")
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size of the batch rows.")
_SECONDS = flags.DEFINE_float("seconds", 2.0, "Minimum time per row.")


def _rate(step: Callable[[int], int], seconds: float) -> float:
  """Units per second of `step(i) -> units done`, after one warm-up call."""
  step(0)
  done, i, start = 0, 1, time.perf_counter()
  while time.perf_counter() - start < seconds:
    done += step(i)
    i += 1
  return done / (time.perf_counter() - start)


def main(argv):
  del argv
  size, seconds = _SIZE.value, _SECONDS.value
  tmp = tempfile.mkdtemp(prefix="input-bench-")
  synthetic.write_split(f"{tmp}/data/train", seed=0, split_index=0, items=_ITEMS.value,
                        image_size=size, cluttered_fraction=0.5, one_to_many=False, title_pattern_prob=0.25)
  split = pipeline.load_split(f"{tmp}/data", "train", cache_dir=f"{tmp}/cache")
  n = split.num_items
  config = config_lib.experiment_config("teacher", "b16").data
  config.item_image_size = config.query_image_size = size
  tokenizer = TitleTokenizer.train(split.titles, 512)
  rng = np.random.default_rng(0)

  def read(i):
    split.items[i % n]
    return 1

  def item(i):
    augment.resize(folder.decode_rgb(split.items[i % n]["image"], size), size, size)
    return 1

  def mosaic(i):
    images = [folder.decode_rgb(split.items[(4 * i + t) % n]["image"], size // 2)
              for t in range(4)]
    augment.mosaic(images, size, 2)
    return 4

  def query(i):
    augment.augment_query(folder.decode_rgb(split.queries[i % n]["image"], size), rng, size)
    return 1

  photo = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(photo, "JPEG")

  def photo_draft(i):
    augment.resize(folder.decode_rgb(photo.getvalue(), size), size, size)
    return 1

  def photo_full(i):
    augment.resize(folder.decode_rgb(photo.getvalue()), size, size)
    return 1

  iterator = pipeline.train_iterator(split, tokenizer, config, batch_size=_BATCH.value,
                                     patch_size=16, max_title_len=32, seed=0)
  records = [split.queries[i % n] for i in range(_BATCH.value)]
  batch_builder = pipeline._TrainBatch(  # pylint: disable=protected-access
      items=split.items, item_sizes=split.item_sizes, item_groups=split.item_groups,
      title_tokens=np.zeros((n, 32), np.int32), title_mask=np.zeros((n, 32), bool),
      item_size=size, query_size=size, grid=size // 16, mosaic_prob=0.5, mosaic_grid=2)

  def train_batch(i):
    batch_builder(records, np.random.default_rng(i))
    return len(records)

  def grain_batch(i):
    next(iterator)
    return _BATCH.value

  rows = [("read", read), ("item", item), ("mosaic", mosaic), ("query", query),
          ("photo jpeg, draft", photo_draft), ("photo jpeg, full decode", photo_full),
          ("train batch", train_batch), ("grain (2 threads)", grain_batch)]
  print(f"input pipeline, {size}px, one process, {seconds:.0f}s per row")
  print(f"{'stage':<26}{'images/s':>12}{'ms/image':>11}{'vs read':>10}")
  baseline = None
  for name, step in rows:
    rate = _rate(step, seconds)
    baseline = baseline or rate
    print(f"{name:<26}{rate:>12.0f}{1000 / rate:>11.2f}{rate / baseline:>10.3f}")
  shutil.rmtree(tmp)


if __name__ == "__main__":
  app.run(main)
