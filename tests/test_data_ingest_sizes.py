"""Tests of images stored at the pipelines' sizes (ingest.stored_image, load_split sizes)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tigerfg_jax import config_lib
from tigerfg_jax.data import augment, ingest, pipeline, synthetic
from tigerfg_jax.data.tokenizer import TitleTokenizer

# 64 px files: items are PNGs, queries JPEGs; at 24 px a query decodes at the 1/2
# JPEG draft (32 px), the path that makes evaluation differ from a plain resize.
FILE_SIZE, ITEM, QUERY = 64, 16, 24


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("catalog"))
  synthetic.write_split(os.path.join(path, "train"), seed=1, split_index=0, items=6,
                        image_size=FILE_SIZE, cluttered_fraction=0.5, one_to_many=False,
                        title_pattern_prob=synthetic.TITLE_PATTERN_PROB)
  return path


def _file(root, kind, row):
  """The bytes of the image file of `kind` ('items' / 'queries') row `row`."""
  with open(os.path.join(root, "train", f"{kind}.jsonl"), encoding="utf-8") as f:
    lines = [json.loads(line) for line in f if line.strip()]
  with open(os.path.join(root, "train", lines[row]["image"]), "rb") as f:
    return f.read()


def _data_config():
  config = config_lib.experiment_config("teacher", "micro").data
  config.item_image_size, config.query_image_size = ITEM, QUERY
  return config


def test_stored_images_are_small_and_evaluate_like_the_files(root, tmp_path):
  split = pipeline.load_split(root, "train", cache_dir=str(tmp_path), item_size=ITEM,
                              query_size=QUERY)
  assert (split.item_store_size, split.query_store_size) == (ITEM, QUERY)
  for kind, source, size in (("items", split.items, ITEM), ("queries", split.queries, QUERY)):
    for row in range(len(source)):
      stored = source[row]["image"]
      original = _file(root, kind, row)
      with Image.open(io.BytesIO(stored)) as image:
        assert (image.format, image.size) == ("PNG", (size, size))
      np.testing.assert_array_equal(augment.eval_image(stored, size),
                                    augment.eval_image(original, size))
  # The boxes keep the files' pixels: the item sizes are the files'.
  assert (split.item_sizes == FILE_SIZE).all()


def test_eval_batches_are_unchanged_by_stored_sizes(root, tmp_path):
  config = _data_config()
  full = pipeline.load_split(root, "train", cache_dir=str(tmp_path))
  sized = pipeline.load_split(root, "train", cache_dir=str(tmp_path), item_size=ITEM,
                              query_size=QUERY)
  tokenizer = TitleTokenizer.train(full.titles, 64)
  batches = [
      [list(pipeline.eval_item_batches(s, tokenizer, config, batch_size=4, max_title_len=8)),
       list(pipeline.eval_query_batches(s, config, batch_size=4))] for s in (full, sized)]
  for a, b in zip(sum(batches[0], []), sum(batches[1], [])):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_images_that_fit_keep_their_bytes():
  png = io.BytesIO()
  Image.fromarray(np.full((20, 30, 3), 7, np.uint8)).save(png, "PNG")
  data = png.getvalue()
  assert ingest.stored_image(data, 30) == data and ingest.stored_image(data, None) == data
  smaller = ingest.stored_image(data, 16)
  with Image.open(io.BytesIO(smaller)) as image:
    assert image.size == (16, 16)


def test_sizes_are_part_of_the_cache_key(root, tmp_path):
  cache = str(tmp_path)
  first = ingest.ingest(root, "train", cache_dir=cache, item_size=ITEM, query_size=QUERY)
  again = ingest.ingest(root, "train", cache_dir=cache, item_size=ITEM, query_size=QUERY)
  other = ingest.ingest(root, "train", cache_dir=cache, item_size=2 * ITEM, query_size=QUERY)
  full = ingest.ingest(root, "train", cache_dir=cache)
  assert first.directory == again.directory
  assert len({first.directory, other.directory, full.directory}) == 3
  assert other.metadata["stored_sizes"] == {"items": 2 * ITEM, "queries": QUERY}
  with pytest.raises(ValueError, match="item_size=0"):
    ingest.ingest(root, "train", cache_dir=cache, item_size=0)
