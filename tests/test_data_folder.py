"""Tests of the dataset folder validator and ArrayRecord ingestion (folder.py, ingest.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tigerfg_jax.data import folder, ingest, pipeline


def _write_image(path, colour, size=(40, 30), fmt="PNG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, colour).save(path, fmt)


def _write_jsonl(path, lines):
  with open(path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _hand_written(root) -> str:
  """A 'shop' split as the docs describe it: 4 items, 3 queries, one with 2 positives."""
  split = os.path.join(root, "shop")
  for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200), (90, 90, 0)]):
    _write_image(os.path.join(split, "img", f"i{i}.png"), colour)
  for i in range(3):
    _write_image(os.path.join(split, "q", f"q{i}.jpg"), (100, 20 * i, 0), (20, 20), "JPEG")
  _write_jsonl(os.path.join(split, "items.jsonl"), [
      {"item_id": "a", "image": "img/i0.png", "title": "Red mug"},
      {"item_id": "b", "image": "img/i1.png", "title": "green mug"},
      {"item_id": "c", "image": "img/i2.png", "title": "blue hat"},
      {"item_id": "d", "image": "img/i3.png", "title": "olive hat"},
  ])
  _write_jsonl(os.path.join(split, "queries.jsonl"), [
      {"query_id": "q0", "image": "q/q0.jpg", "item_ids": ["a"], "box": [2, 3, 20, 25.5]},
      {"query_id": "q1", "image": "q/q1.jpg", "item_ids": ["c", "d"], "box": None},
      {"query_id": "q2", "image": "q/q2.jpg", "item_ids": ["b"]},
  ])
  return split


@pytest.fixture
def shop(tmp_path):
  return _hand_written(str(tmp_path)), str(tmp_path)


def _edit_line(path, number, new_line):
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  lines[number - 1] = new_line if isinstance(new_line, bytes) else new_line.encode()
  with open(path, "wb") as f:
    f.write(b"\n".join(lines))


def _problems(root, split="shop"):
  with pytest.raises(folder.DatasetError) as error:
    folder.read_split(root, split)
  return error.value


def test_hand_written_folder_reads(shop):
  split_dir, root = shop
  records = folder.read_split(root, "shop")
  assert [i.item_id for i in records.items] == ["a", "b", "c", "d"]
  assert records.items[0].title == "Red mug"
  assert (records.items[0].width, records.items[0].height) == (40, 30)
  assert [q.positives for q in records.queries] == [(0,), (2, 3), (1,)]
  assert records.queries[0].box == (2.0, 3.0, 20.0, 25.5)
  assert records.queries[1].box is None and records.queries[2].box is None
  assert records.skipped == []


def test_corrupt_jpeg(shop):
  split_dir, root = shop
  with open(os.path.join(split_dir, "img", "i1.png"), "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
  error = _problems(root)
  assert f"{split_dir}/items.jsonl:2" in str(error)
  assert "cannot decode image" in str(error) and "i1.png" in str(error)


def test_missing_image(shop):
  split_dir, root = shop
  os.remove(os.path.join(split_dir, "q", "q2.jpg"))
  error = _problems(root)
  assert f"{split_dir}/queries.jsonl:3" in str(error) and "does not exist" in str(error)


def test_empty_title(shop):
  split_dir, root = shop
  _edit_line(os.path.join(split_dir, "items.jsonl"), 3,
             json.dumps({"item_id": "c", "image": "img/i2.png", "title": "  "}))
  error = _problems(root)
  assert f"{split_dir}/items.jsonl:3" in str(error) and "'title'" in str(error)


def test_unknown_item_id(shop):
  split_dir, root = shop
  _edit_line(os.path.join(split_dir, "queries.jsonl"), 2,
             json.dumps({"query_id": "q1", "image": "q/q1.jpg", "item_ids": ["c", "zz"]}))
  error = _problems(root)
  assert f"{split_dir}/queries.jsonl:2" in str(error) and "'zz' is not in items.jsonl" in str(error)


@pytest.mark.parametrize("box", [[2, 3, 41, 20], [-1, 0, 5, 5], [5, 5, 5, 9], [1, 2, 3], "x"])
def test_bad_box(shop, box):
  split_dir, root = shop
  _edit_line(os.path.join(split_dir, "queries.jsonl"), 1,
             json.dumps({"query_id": "q0", "image": "q/q0.jpg", "item_ids": ["a"], "box": box}))
  error = _problems(root)
  assert f"{split_dir}/queries.jsonl:1" in str(error) and "box" in str(error)


def test_non_utf8_and_bad_json_and_duplicates(shop):
  split_dir, root = shop
  items = os.path.join(split_dir, "items.jsonl")
  _edit_line(items, 2, b'{"item_id": "b", "image": "img/i1.png", "title": "caf\xe9"}')
  _edit_line(items, 3, '{"item_id": "c", "image": ')
  _edit_line(items, 4, json.dumps({"item_id": "a", "image": "img/i3.png", "title": "x"}))
  error = _problems(root)
  text = str(error)
  assert len(error.problems) >= 3
  assert f"{items}:2: not UTF-8" in text
  assert f"{items}:3: bad JSON" in text
  assert f"{items}:4: duplicate item_id 'a' (first on line 1)" in text


def test_missing_queries_file(shop):
  split_dir, root = shop
  os.remove(os.path.join(split_dir, "queries.jsonl"))
  with pytest.raises(folder.DatasetError, match="queries.jsonl: missing"):
    folder.read_split(root, "shop")


def test_skip_bad_counts_and_keeps_good_rows(shop):
  split_dir, root = shop
  items = os.path.join(split_dir, "items.jsonl")
  _edit_line(items, 2, json.dumps({"item_id": "b", "image": "img/nope.png", "title": "t"}))
  _edit_line(os.path.join(split_dir, "queries.jsonl"), 2, "not json")
  records = folder.read_split(root, "shop", skip_bad=True)
  # Item b is bad; query 2 is bad JSON; query 3 names the skipped item b.
  assert len(records.skipped) == 3
  assert [i.item_id for i in records.items] == ["a", "c", "d"]
  assert [q.query_id for q in records.queries] == ["q0"]
  assert any("'b' is invalid (skipped)" in p for p in records.skipped)
  split = pipeline.load_split(root, "shop", cache_dir=os.path.join(root, "cache"), skip_bad=True)
  assert split.item_ids == ["a", "c", "d"] and len(split.skipped) == 3


def test_eval_splits(tmp_path):
  for name in ("train", "eval_b", "eval_a", "evaluation"):
    os.makedirs(tmp_path / name)
  (tmp_path / "eval_file").write_text("")
  assert folder.eval_splits(str(tmp_path)) == ["eval_a", "eval_b", "evaluation"]


def test_ingest_rows_keep_folder_order_and_cache_is_reused(shop):
  split_dir, root = shop
  cache = os.path.join(root, "cache")
  split = pipeline.load_split(root, "shop", cache_dir=cache)
  assert split.item_ids == ["a", "b", "c", "d"]
  assert split.titles == ["Red mug", "green mug", "blue hat", "olive hat"]
  assert split.query_positives == [[0], [2, 3], [1]]
  assert split.item_groups.tolist() == [0, 1, 2, 2]
  for row, item_id in enumerate(split.item_ids):
    record = split.items[row]
    assert record["item_id"].decode() == item_id and int(record["row"]) == row
    with open(os.path.join(split_dir, "img", f"i{row}.png"), "rb") as f:
      assert record["image"] == f.read()
  # A row past the end is an IndexError (not a read error), so the sources iterate.
  assert [int(r["row"]) for r in split.items] == [0, 1, 2, 3]
  with pytest.raises(IndexError):
    split.queries[3]
  query = split.queries[0]
  np.testing.assert_array_equal(query["box"], [2, 3, 20, 25.5])
  assert bool(query["has_box"]) and not bool(split.queries[1]["has_box"])
  assert split.queries[1]["positives"].tolist() == [2, 3]
  entries = os.listdir(cache)
  again = ingest.ingest(root, "shop", cache_dir=cache)
  assert os.listdir(cache) == entries and again.directory == os.path.join(cache, entries[0])
  _write_jsonl(os.path.join(split_dir, "items.jsonl"), [
      {"item_id": "a", "image": "img/i0.png", "title": "red mug v2"},
      {"item_id": "b", "image": "img/i1.png", "title": "green mug"},
      {"item_id": "c", "image": "img/i2.png", "title": "blue hat"},
      {"item_id": "d", "image": "img/i3.png", "title": "olive hat"}])
  changed = pipeline.load_split(root, "shop", cache_dir=cache)
  assert changed.titles[0] == "red mug v2" and len(os.listdir(cache)) == 2


def test_truncated_shard_is_reported(shop):
  split_dir, root = shop
  cache = os.path.join(root, "cache")
  entry = ingest.ingest(root, "shop", cache_dir=cache)
  shard = next(p for p in entry.metadata["shards"] if p.startswith("items"))
  path = os.path.join(entry.directory, shard)
  with open(path, "r+b") as f:
    f.truncate(100)
  with pytest.raises(folder.DatasetError, match="truncated") as error:
    pipeline.load_split(root, "shop", cache_dir=cache)
  assert path in str(error.value)
  # A shard damaged after opening is reported when a row is read.
  shutil.rmtree(cache)
  split = pipeline.load_split(root, "shop", cache_dir=cache)
  entry = ingest.ingest(root, "shop", cache_dir=cache)
  with open(os.path.join(entry.directory, shard), "r+b") as f:
    f.truncate(100)
  with pytest.raises(folder.DatasetError, match="cannot read row 0") as error:
    split.items[0]
  assert shard.split("/")[-1] in str(error.value)
