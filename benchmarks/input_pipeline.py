"""Input pipeline throughput per core at a preset's image sizes: one table.

  python benchmarks/input_pipeline.py [--preset=b16 --items=256 --batch=64 --seconds=2]

Writes a small synthetic catalog (`--items` train items at the preset's
`data.synthetic_image_size`, 224 px for b16: PNG items, JPEG queries) to a temporary
folder, ingests it at the preset's item and query sizes (as training loads it), then
times each stage in one thread of this process (what one Grain worker does per core):
  read          one ArrayRecord row, no decoding: the baseline of the ratios.
  item          read + decode (+ resize) to the item size (an original training item).
  mosaic        read + decode 4 items + a Mosaic canvas of their whole images (4
                products on a background), per item image.
  query         read + decode + random resized crop, flip, colour jitter.
  query crop    the same without flip and colour jitter (what is left on the host if
                they move to the device: tigerfg_jax/data/device_augment.py).
  photo jpeg    a 640x480 JPEG photo decoded and resized, with and without the JPEG
                draft (reduced-scale decoding): an item the cache does not store at size.
  train unit    one unit of the training map (a Mosaic unit or mosaic_max_products
                originals, with their queries, titles, boxes, spatial targets), per
                example.
  train batch   all units of a batch and their concatenation, per example: the
                per-core training rate; "+ target crops" also cuts the teacher's
                `target_image` (`target_crops=True`).
  grain         `train_iterator` end to end in this process (2 threads), per example.
Rates are images (or examples) per CPU second of this process (all its threads; one
thread except the grain row), so what a core does whoever else shares the machine, and
per wall second; each row is timed `--repeats` times and the best kept. Ratios are
against `read`. The last line is `train_examples_per_s_per_core=X`: the train batch
row, per CPU second.
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
from tigerfg_jax.data import augment, folder, mosaic, pipeline, synthetic
from tigerfg_jax.data.tokenizer import TitleTokenizer

_PRESET = flags.DEFINE_enum("preset", "b16", config_lib.PRESETS, "Preset of the sizes.")
_ITEMS = flags.DEFINE_integer("items", 512, "Items of the synthetic train split.")
_BATCH = flags.DEFINE_integer("batch", 64, "Examples per batch of the train rows.")
_SECONDS = flags.DEFINE_float("seconds", 2.0, "Minimum time per row.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timings per row; the best is kept.")

# Distill examples/s one H100 consumes at 50% MFU at the b16 preset: an estimate from
# the step's FLOPs (student + teacher forward, student backward), not a measurement.
H100_EXAMPLES_PER_S = 1650


def _rate(step: Callable[[int], int], seconds: float, repeats: int) -> tuple[float, float]:
  """Units of `step(i) -> units done` per CPU second of this process and per wall second,
  each the best of `repeats` timings of at least `seconds` (wall), after one warm-up call.

  CPU time counts what the work costs a core even when other programs share the cores
  (wall time then also counts the waits for a core).
  """
  step(0)
  best_cpu, best_wall, i = 0.0, 0.0, 1
  for _ in range(repeats):
    done, wall, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
      done += step(i)
      i += 1
    best_cpu = max(best_cpu, done / (time.process_time() - cpu))
    best_wall = max(best_wall, done / (time.perf_counter() - wall))
  return best_cpu, best_wall


def _stages(split: pipeline.Split, config, rng: np.random.Generator) -> list[tuple[str, Callable]]:
  """(name, step) of the single-image rows."""
  n, item_size, query_size = split.num_items, config.item_image_size, config.query_image_size

  def read(i):
    split.items[i % n]
    return 1

  def item(i):
    augment.eval_image(split.items[i % n]["image"], item_size)
    return 1

  def canvas(i):
    images = [folder.decode_rgb(split.items[(4 * i + t) % n]["image"]) for t in range(4)]
    mosaic.compose([mosaic.Product(image, None, 1.0) for image in images], item_size, rng)
    return 4

  def query(i):
    image = folder.decode_rgb(split.queries[i % n]["image"], query_size)
    augment.augment_query(image, rng, query_size)
    return 1

  def query_crop(i):
    image = folder.decode_rgb(split.queries[i % n]["image"], query_size)
    np.asarray(augment.random_resized_crop(image, rng, query_size), np.uint8)
    return 1

  photo = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(photo, "JPEG")

  def photo_draft(i):
    augment.eval_image(photo.getvalue(), item_size)
    return 1

  def photo_full(i):
    augment.resize(folder.decode_rgb(photo.getvalue()), item_size, item_size)
    return 1

  return [("read", read), ("item", item), ("mosaic", canvas), ("query", query),
          ("query crop (no flip/jitter)", query_crop), ("photo jpeg, draft", photo_draft),
          ("photo jpeg, full decode", photo_full)]


def main(argv):
  del argv
  seconds, repeats, batch_size = _SECONDS.value, _REPEATS.value, _BATCH.value
  full = config_lib.experiment_config("distill", _PRESET.value)
  config = full.data
  tmp = tempfile.mkdtemp(prefix="input-bench-")
  try:
    synthetic.write_catalog(f"{tmp}/data", seed=0, items=_ITEMS.value, eval_items=1,
                            image_size=config.synthetic_image_size,
                            clutter_grid=config.synthetic_clutter_grid)
    split = pipeline.load_split(f"{tmp}/data", "train", cache_dir=f"{tmp}/cache",
                                item_size=config.item_image_size,
                                query_size=config.query_image_size)
    tokenizer = TitleTokenizer.train(split.titles, config.vocab_size)
    train_args = dict(batch_size=batch_size, patch_size=full.model.patch_size,
                      max_title_len=full.model.max_title_len, seed=0)
    units, per_batch = pipeline.train_units(split, tokenizer, config, **train_args)
    with_targets, _ = pipeline.train_units(split, tokenizer, config, target_crops=True,
                                           **train_args)
    config.worker_count = 0
    iterator = pipeline.train_iterator(split, tokenizer, config, **train_args)

    def train_unit(i):
      return len(units[i]["group"])

    def train_batch(i, source=units):
      return len(pipeline._concatenate(  # pylint: disable=protected-access
          [source[j] for j in range(i * per_batch, (i + 1) * per_batch)])["group"])

    def grain_batch(i):
      return len(next(iterator)["group"])

    rows = _stages(split, config, np.random.default_rng(0)) + [
        ("train unit", train_unit), ("train batch", train_batch),
        ("train batch + target crops", lambda i: train_batch(i, with_targets)),
        ("grain (2 threads)", grain_batch)]
    print(f"input pipeline, preset {_PRESET.value}: items {config.item_image_size} px, "
          f"queries {config.query_image_size} px, batch {batch_size}, mosaic_prob "
          f"{config.mosaic_prob}; one thread, best of {repeats} x {seconds:.0f}s per row")
    print(f"{'stage':<30}{'per CPU-s':>10}{'CPU ms':>8}{'vs read':>9}{'per wall-s':>12}")
    rates = {}
    for name, step in rows:
      rates[name], wall = _rate(step, seconds, repeats)
      ratio = rates[name] / rates["read"]
      print(f"{name:<30}{rates[name]:>10.0f}{1000 / rates[name]:>8.2f}{ratio:>9.3f}"
            f"{wall:>12.0f}")
    iterator.close()
  finally:
    shutil.rmtree(tmp)
  per_core = rates["train batch"]
  print(f"one H100 at 50% MFU consumes ~{H100_EXAMPLES_PER_S} distill examples/s "
        f"(estimate from FLOPs): {per_core / H100_EXAMPLES_PER_S:.3f} of it per core, "
        f"{H100_EXAMPLES_PER_S / per_core:.1f} cores to feed it")
  print(f"train_examples_per_s_per_core={per_core:.0f}")


if __name__ == "__main__":
  app.run(main)
