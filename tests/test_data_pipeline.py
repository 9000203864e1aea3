"""Tests of the Grain pipelines (tigerfg_jax/data/pipeline.py) on a tiny synthetic catalog."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

from tigerfg_jax import config_lib
from tigerfg_jax.data import augment, folder, pipeline, spatial, synthetic
from tigerfg_jax.data.tokenizer import TitleTokenizer

SIZE, PATCH, BATCH, MAX_LEN = 32, 8, 8, 16


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("catalog"))
  synthetic.write_catalog(path, seed=0, items=24, image_size=48)
  return path


@pytest.fixture(scope="module")
def split(root, tmp_path_factory):
  return pipeline.load_split(root, "train", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tokenizer(split):
  return TitleTokenizer.train(split.titles, 128)


def _data_config(**overrides):
  config = config_lib.experiment_config("teacher", "micro").data
  config.item_image_size = config.query_image_size = SIZE
  config.mosaic_max_products = 4  # the tests below count units of 4.
  for key, value in overrides.items():
    config[key] = value
  return config


def _batches(split, tokenizer, count, seed=0, start_state=None, batch_size=BATCH,
             process_index=0, process_count=1, target_crops=False, **data_overrides):
  """The first `count` batches of a new train_iterator (resumed from `start_state`)."""
  iterator = pipeline.train_iterator(
      split, tokenizer, _data_config(**data_overrides), batch_size=batch_size,
      patch_size=PATCH, max_title_len=MAX_LEN, seed=seed, process_index=process_index,
      process_count=process_count, target_crops=target_crops)
  if start_state is not None:
    iterator.set_state(start_state)
  return iterator, [next(iterator) for _ in range(count)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


def _item_pixels(split, row):
  return folder.decode_rgb(split.items[row]["image"])


def _pil_crop(split, row, box, width, height):
  """Independent reference: the stored item image's normalised `box` region (None: all
  of it) resized by PIL alone to uint8 [height, width, 3]."""
  image = Image.open(io.BytesIO(split.items[row]["image"])).convert("RGB")
  w, h = image.size
  region = (0, 0, w, h) if box is None else (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
  return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR, box=region))


def _context(split, row, box):
  """Independent reference of the teacher's crop region: the square of side 1.2 x the
  box's longer side (in the file's pixels) about its centre, moved inside the image."""
  width, height = (float(v) for v in split.item_sizes[row])
  x0, y0, x1, y1 = np.asarray(box, np.float64) * [width, height, width, height]
  side = 1.2 * max(x1 - x0, y1 - y0)
  region = []
  for lo, hi, extent in ((x0, x1, width), (y0, y1, height)):
    length = min(side, extent)
    start = np.clip((lo + hi) / 2 - length / 2, 0, extent - length)
    region.append((start / extent, (start + length) / extent))
  (left, right), (top, bottom) = region
  return np.asarray([left, top, right, bottom])


def _query_box(split, row):
  """The normalised box of the query whose only positive is item `row`."""
  query = split.query_positives.index([row])
  return spatial.normalize_box(split.query_boxes[query], *split.item_sizes[row])


def _canvases(batch, unit=4):
  """Row lists of the batch's canvases: rows of one unit sharing one item image."""
  canvases = []
  for start in range(0, len(batch["group"]), unit):
    rows = range(start, min(start + unit, len(batch["group"])))
    for e in rows:
      same = [f for f in rows if np.array_equal(batch["item_image"][e], batch["item_image"][f])]
      if len(same) > 1 and same[0] == e:
        canvases.append(same)
  return canvases


def test_batch_matches_the_contract(split, tokenizer):
  _, (batch,) = _batches(split, tokenizer, 1)
  n = (SIZE // PATCH) ** 2
  expected = {
      "query_image": (np.uint8, (BATCH, SIZE, SIZE, 3)),
      "item_image": (np.uint8, (BATCH, SIZE, SIZE, 3)),
      "title_tokens": (np.int32, (BATCH, MAX_LEN)),
      "title_mask": (np.bool_, (BATCH, MAX_LEN)),
      "box": (np.float32, (BATCH, 4)),
      "has_box": (np.bool_, (BATCH,)),
      "spatial_target": (np.float32, (BATCH, n)),
      "group": (np.int32, (BATCH,)),
  }
  # target_crops=False (the default): no target_image key.
  assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == expected
  np.testing.assert_allclose(batch["spatial_target"].sum(1), 1.0, atol=1e-5)
  assert ((batch["box"] >= 0) & (batch["box"] <= 1)).all()
  tokens, mask = tokenizer.encode([split.titles[g] for g in batch["group"]], MAX_LEN)
  np.testing.assert_array_equal(batch["title_tokens"], tokens)
  np.testing.assert_array_equal(batch["title_mask"], mask)


def test_same_seed_same_batches_other_seed_other(split, tokenizer):
  _, a = _batches(split, tokenizer, 3, seed=1)
  _, b = _batches(split, tokenizer, 3, seed=1)
  _, c = _batches(split, tokenizer, 1, seed=2)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert not np.array_equal(a[0]["query_image"], c[0]["query_image"])


def test_resume_from_saved_state(split, tokenizer):
  iterator, _ = _batches(split, tokenizer, 4, seed=3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(2)]
  _, resumed = _batches(split, tokenizer, 2, seed=3, start_state=state)
  for x, y in zip(expected, resumed):
    _assert_same(x, y)


def test_process_shards_are_disjoint_and_cover_each_epoch(split, tokenizer):
  # Without one-to-many queries every item is its own group and has one query, so
  # the groups of a batch name the queries it holds.
  assert sorted(split.item_groups.tolist()) == list(range(split.num_items))
  steps = split.num_queries // BATCH
  seen = []
  for p in range(2):
    _, batches = _batches(split, tokenizer, steps * 2, process_index=p, process_count=2)
    assert all(len(b["group"]) == BATCH // 2 for b in batches)
    seen.append([b["group"].tolist() for b in batches])
  for epoch in range(2):
    groups = [g for p in range(2) for b in seen[p][epoch * steps:(epoch + 1) * steps] for g in b]
    assert sorted(groups) == list(range(split.num_queries))
  assert seen[0][:steps] != seen[0][steps:]  # reshuffled each epoch


def test_originals_use_the_item_image_and_query_box(split, tokenizer):
  _, (batch,) = _batches(split, tokenizer, 1, mosaic_prob=0.0, target_crops=True)
  _, (without,) = _batches(split, tokenizer, 1, mosaic_prob=0.0)
  assert "target_image" not in without
  for e, row in enumerate(batch["group"]):
    expected = augment.resize(_item_pixels(split, row), SIZE, SIZE)
    np.testing.assert_array_equal(batch["item_image"][e], expected)
    box = _query_box(split, row)
    np.testing.assert_allclose(batch["box"][e], box)
    # The teacher's input: the square context of the box in the stored image, resized.
    np.testing.assert_array_equal(batch["target_image"][e],
                                  _pil_crop(split, row, _context(split, row, box), SIZE, SIZE))
    np.testing.assert_allclose(batch["spatial_target"][e],
                               spatial.patch_target(box, SIZE // PATCH), atol=1e-6)


def test_mosaic_pastes_each_product_at_its_box(split, tokenizer):
  _, batches = _batches(split, tokenizer, 4, mosaic_prob=1.0, target_crops=True)
  grid, low, high = SIZE // PATCH, 0.30 * SIZE, 0.55 * SIZE
  sizes = set()
  for batch in batches:
    canvases = _canvases(batch)
    on_canvas = {e for rows in canvases for e in rows}
    for rows in canvases:
      sizes.add(len(rows))
      assert len(rows) <= 4 and batch["has_box"][rows].all()
      # Distractors are other products: other groups and other titles.
      assert len({int(batch["group"][e]) for e in rows}) == len(rows)
      titles = {split.titles[batch["group"][e]] for e in rows}
      assert len(titles) == len(rows)
      rects = {e: np.rint(batch["box"][e] * SIZE).astype(int) for e in rows}
      for e in rows:
        row = int(batch["group"][e])
        x0, y0, x1, y1 = rects[e]
        assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        assert low <= max(x1 - x0, y1 - y0) <= high
        # The product is the query box's region, aspect kept (in the file's pixels).
        box = _query_box(split, row)
        width, height = split.item_sizes[row]
        aspect = (box[2] - box[0]) * width / ((box[3] - box[1]) * height)
        assert abs((x1 - x0) / (y1 - y0) - aspect) <= aspect * 1.0 / min(x1 - x0, y1 - y0)
        expected = _pil_crop(split, row, box, x1 - x0, y1 - y0)
        others = np.zeros((SIZE, SIZE), bool)
        for f in rows:
          if f != e:
            others[rects[f][1]:rects[f][3], rects[f][0]:rects[f][2]] = True
        visible = ~others[y0:y1, x0:x1]
        assert visible.any()
        np.testing.assert_array_equal(batch["item_image"][e][y0:y1, x0:x1][visible],
                                      expected[visible])
        np.testing.assert_array_equal(
            batch["target_image"][e],
            _pil_crop(split, row, _context(split, row, _query_box(split, row)), SIZE, SIZE))
        np.testing.assert_allclose(batch["spatial_target"][e],
                                   spatial.patch_target(batch["box"][e], grid), atol=1e-6)
    for e in set(range(BATCH)) - on_canvas:
      row = int(batch["group"][e])
      np.testing.assert_array_equal(batch["item_image"][e],
                                    augment.resize(_item_pixels(split, row), SIZE, SIZE))
      np.testing.assert_allclose(batch["box"][e], _query_box(split, row))
  assert sizes >= {2, 3}


def test_mosaic_fraction(split, tokenizer):
  # All titles and groups of this catalog differ, so every product of a canvas stays.
  assert len(set(split.titles)) == split.num_items
  for prob in (0.25, 0.5):
    _, batches = _batches(split, tokenizer, 40, mosaic_prob=prob)
    fraction = np.mean([sum(len(rows) for rows in _canvases(b)) / BATCH for b in batches])
    assert abs(fraction - prob) < 0.08, (prob, fraction)


def test_mosaic_leaves_out_products_of_one_group_or_title():
  tokens = np.asarray([[1, 5, 2], [1, 5, 2], [1, 6, 2], [1, 7, 2], [1, 8, 2]], np.int32)
  unit = pipeline._TrainUnit(
      items=None, item_sizes=np.ones((5, 2)), item_groups=np.asarray([0, 1, 2, 2, 3]),
      title_tokens=tokens, title_mask=tokens > 0, item_size=SIZE, query_size=SIZE, grid=4,
      mosaic_prob=1.0, max_products=4, flip_and_jitter=False, target_crops=False,
      batch_size=4, layout_seed=0)
  rng = np.random.default_rng(0)
  kept_sizes = set()
  for _ in range(200):
    # Items 0 and 1 share a title, items 2 and 3 a group; item 4 differs from all.
    rows = np.asarray(rng.permutation([0, 1, 2, 3, 4])[:4])
    for members in unit._canvases(rows, rng):
      items = set(rows[members].tolist())
      assert len(members) >= 2 and not {0, 1} <= items and not {2, 3} <= items
      kept_sizes.add(len(members))
  assert kept_sizes == {2, 3}
  assert unit._canvases(np.asarray([2, 3, 2, 3]), rng) == []


def test_one_to_many_groups_and_positive_choice(tmp_path, tokenizer):
  synthetic.write_catalog(str(tmp_path), seed=5, items=12, image_size=32, one_to_many=True)
  split = pipeline.load_split(str(tmp_path), "train", cache_dir=str(tmp_path / "cache"))
  for positives in split.query_positives:
    assert len({int(split.item_groups[p]) for p in positives}) == 1
  assert len(set(split.item_groups.tolist())) < split.num_items
  _, batches = _batches(split, TitleTokenizer.train(split.titles, 64), 6, batch_size=4,
                        mosaic_prob=0.0, target_crops=True)
  for batch in batches:
    for e in range(4):
      if not batch["has_box"][e]:
        # The box is known only for item_ids[0]; another positive was drawn.
        np.testing.assert_array_equal(batch["box"][e], 0)
        np.testing.assert_allclose(batch["spatial_target"][e], 1 / 16, atol=1e-7)
        # Without a box the teacher sees the whole item image (one of the group's items).
        target = batch["target_image"][e]
        np.testing.assert_array_equal(target, batch["item_image"][e])
        rows = np.flatnonzero(split.item_groups == batch["group"][e])
        assert any(np.array_equal(_pil_crop(split, r, None, SIZE, SIZE), target) for r in rows)
  assert not all(b["has_box"].all() for b in batches)


def test_positive_groups_union():
  groups = pipeline.positive_groups(6, [[0], [1, 3], [3, 4], [2]])
  assert groups.tolist() == [0, 1, 2, 1, 1, 3]


def test_eval_batches_in_order_padded(root, split, tokenizer):
  config = _data_config()
  items = list(pipeline.eval_item_batches(split, tokenizer, config, batch_size=10,
                                          max_title_len=MAX_LEN))
  queries = list(pipeline.eval_query_batches(split, config, batch_size=10))
  assert len(items) == len(queries) == 3
  index = np.concatenate([b["index"] for b in items])
  valid = np.concatenate([b["valid"] for b in items])
  assert index[valid].tolist() == list(range(24)) and (index[~valid] == -1).all()
  assert valid.sum() == 24 and not valid[24:].any()
  last = items[-1]
  assert not last["title_mask"][4:].any() and (last["item_image"][4:] == 0).all()
  tokens, _ = tokenizer.encode(split.titles[20:], MAX_LEN)
  np.testing.assert_array_equal(last["title_tokens"][:4], tokens)
  np.testing.assert_array_equal(items[1]["item_image"][3],
                                augment.resize(_item_pixels(split, 13), SIZE, SIZE))
  query_file = os.path.join(root, "train", "queries", "00007.jpg")
  np.testing.assert_array_equal(queries[0]["query_image"][7],
                                augment.resize(Image.open(query_file).convert("RGB"), SIZE, SIZE))
  assert queries[0]["query_image"].shape == (10, SIZE, SIZE, 3)
  again = list(pipeline.eval_query_batches(split, config, batch_size=10))
  for a, b in zip(queries, again):
    _assert_same(a, b)


def test_worker_processes_give_the_same_batches_and_resume_across_counts(split, tokenizer):
  flags.FLAGS.mark_as_parsed()  # grain worker processes read absl flags (GOTCHAS.md).
  _, expected = _batches(split, tokenizer, 5, seed=4, target_crops=True)
  assert "target_image" in expected[0] and _canvases(expected[0])
  iterator, batches = _batches(split, tokenizer, 2, seed=4, worker_count=2, target_crops=True)
  try:
    state = json.loads(json.dumps(iterator.get_state()))
    batches += [next(iterator) for _ in range(3)]
  finally:
    iterator.close()
  for x, y in zip(expected, batches):
    _assert_same(x, y)
  # The state is the same for any worker count: restore it in-process.
  _, resumed = _batches(split, tokenizer, 3, seed=4, start_state=state, target_crops=True)
  for x, y in zip(expected[2:], resumed):
    _assert_same(x, y)


def test_units_follow_batches_when_products_do_not_divide_them(split, tokenizer):
  # 10 examples, units of up to 4: units of 4, 4, 2; at mosaic_prob 1 the two full units
  # are Mosaic units and the last two examples are built normally.
  batch_size = 10
  _, batches = _batches(split, tokenizer, 5, batch_size=batch_size, mosaic_prob=1.0)
  _, plain = _batches(split, tokenizer, 5, batch_size=batch_size, mosaic_prob=0.0)
  for batch, other in zip(batches, plain):
    canvases = _canvases(batch)
    assert canvases and all(max(rows) < 8 for rows in canvases)
    assert all(rows[0] // 4 == rows[-1] // 4 for rows in canvases)
    for e in (8, 9):
      np.testing.assert_array_equal(batch["item_image"][e], other["item_image"][e])
    # Mosaics change item images and boxes, not which queries the batch holds.
    np.testing.assert_array_equal(batch["group"], other["group"])
  steps = split.num_queries // batch_size
  groups = [g for b in batches[:steps] for g in b["group"].tolist()]
  assert len(set(groups)) == len(groups)


def test_set_state_refuses_a_foreign_state(split, tokenizer):
  iterator, _ = _batches(split, tokenizer, 0)
  with pytest.raises(ValueError, match="next_index"):
    iterator.set_state({"next_index": 2, "workers": [0]})


def test_worker_count_from_the_cores():
  cores = len(os.sched_getaffinity(0))
  assert pipeline.worker_count(3) == 3 and pipeline.worker_count(0) == 0
  assert pipeline.worker_count(-1) == max(1, cores - 2)
  with pytest.raises(ValueError, match="data.worker_count"):
    pipeline.worker_count(-2)
  config = config_lib.experiment_config("distill", "b16")
  assert config.data.worker_count == -1 and config.data.device_augment
  config.data.worker_count = -2
  with pytest.raises(ValueError, match=r"config.data.worker_count=-2"):
    config_lib.validate(config)


def test_split_stored_at_another_size_is_refused(root, tmp_path, tokenizer):
  sized = pipeline.load_split(root, "train", cache_dir=str(tmp_path), item_size=16,
                              query_size=SIZE)
  with pytest.raises(ValueError, match="data.item_image_size=32"):
    _batches(sized, tokenizer, 1)
  with pytest.raises(ValueError, match="stores images at 16 px"):
    pipeline.eval_item_batches(sized, tokenizer, _data_config(), batch_size=4,
                               max_title_len=MAX_LEN)


def test_context_box_closed_forms():
  # 200 x 100 image; a 20 x 10 px box centred at (100, 50): a 24 px square about it.
  np.testing.assert_allclose(augment.context_box([0.45, 0.45, 0.55, 0.55], 200, 100),
                             [88 / 200, 38 / 100, 112 / 200, 62 / 100], atol=1e-6)
  # At the left edge the square moves right, keeping its side.
  np.testing.assert_allclose(augment.context_box([0.0, 0.4, 0.1, 0.6], 200, 100),
                             [0.0, 0.38, 24 / 200, 0.62], atol=1e-6)
  # Larger than the image along y: clipped to the whole height.
  np.testing.assert_allclose(augment.context_box([0.2, 0.1, 0.8, 0.9], 200, 100),
                             [0.5 - 72 / 200, 0.0, 0.5 + 72 / 200, 1.0], atol=1e-6)
