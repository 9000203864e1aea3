"""Tests of the dataset folder validator and ArrayRecord ingestion (folder.py, ingest.py)."""

from __future__ import annotations

import json
import os
import shutil
import stat

from absl import logging as absl_logging

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


@pytest.mark.parametrize("data, reason", [
    (b"\xff\xd8\xff\xe0 not really a jpeg", "Truncated File Read"),
    (b"plain text, no image header", "not in an image format Pillow reads (or damaged)")])
def test_corrupt_image_names_the_file(shop, data, reason):
  split_dir, root = shop
  with open(os.path.join(split_dir, "img", "i1.png"), "wb") as f:
    f.write(data)
  error = _problems(root)
  image = os.path.join(split_dir, "img", "i1.png")
  assert error.problems[0] == f"{split_dir}/items.jsonl:2: cannot decode image {image}: {reason}"
  assert "BytesIO" not in str(error)


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


@pytest.mark.parametrize("empty", [["items.jsonl"], ["queries.jsonl"],
                                   ["items.jsonl", "queries.jsonl"]])
def test_empty_file_is_one_line(shop, empty):
  split_dir, root = shop
  for name in empty:
    with open(os.path.join(split_dir, name), "w", encoding="utf-8") as f:
      f.write("\n  \n")
  for skip_bad in (False, True):
    with pytest.raises(folder.DatasetError) as error:
      folder.read_split(root, "shop", skip_bad=skip_bad)
    assert error.value.problems == [
        f"{split_dir}/{name}: file is empty; expected one JSON object per line (docs/DATA.md)"
        for name in empty]


def test_invalid_item_is_called_skipped_only_when_skipped(shop):
  split_dir, root = shop
  _edit_line(os.path.join(split_dir, "items.jsonl"), 2,
             json.dumps({"item_id": "b", "image": "img/nope.png", "title": "t"}))
  error = _problems(root)
  assert f"{split_dir}/queries.jsonl:3: item_id 'b' is invalid (see items.jsonl:2)" in (
      error.problems)
  assert "skipped" not in " ".join(error.problems)
  assert f"({folder.SKIP_BAD_FLAG} skips the bad records)" in str(error)
  assert folder.SKIP_BAD_FLAG == "--config.data.skip_bad=true"
  records = folder.read_split(root, "shop", skip_bad=True)
  assert f"{split_dir}/queries.jsonl:3: item_id 'b' is invalid (skipped)" in records.skipped


def _bad_root(tmp_path):
  """train and eval_a fine, eval_b with a bad box, eval_c with an empty queries file."""
  root = str(tmp_path / "data")
  for name in ("train", "eval_a", "eval_b", "eval_c"):
    shutil.copytree(_hand_written(str(tmp_path / "src" / name)), os.path.join(root, name))
  _edit_line(os.path.join(root, "eval_b", "queries.jsonl"), 1,
             json.dumps({"query_id": "q0", "image": "q/q0.jpg", "item_ids": ["a"],
                         "box": [0, 0, 99, 5]}))
  open(os.path.join(root, "eval_c", "queries.jsonl"), "w").close()
  return root


def test_read_splits_reports_every_bad_split(tmp_path):
  root = _bad_root(tmp_path)
  with pytest.raises(folder.DatasetError) as error:
    folder.read_splits(root)
  text = str(error.value)
  assert text.startswith(f"2 of 4 split(s) of {root} are invalid:")
  assert len(error.value.problems) == 2
  assert error.value.problems[0].startswith(f"{root}/eval_b/queries.jsonl:1: box [0, 0, 99, 5]")
  assert error.value.problems[1].startswith(f"{root}/eval_c/queries.jsonl: file is empty")
  assert "eval_a" not in text and "/train" not in text
  shutil.rmtree(os.path.join(root, "eval_b"))
  shutil.rmtree(os.path.join(root, "eval_c"))
  assert list(folder.read_splits(root)) == ["train", "eval_a"]
  with pytest.raises(folder.DatasetError, match="dataset folder does not exist"):
    folder.read_splits(str(tmp_path / "nowhere"))


def test_load_splits_reports_every_bad_split(tmp_path):
  root = _bad_root(tmp_path)
  cache = str(tmp_path / "cache")
  with pytest.raises(folder.DatasetError) as error:
    pipeline.load_splits(root, cache_dir=cache)
  assert [p.split(":")[0] for p in error.value.problems] == [
      f"{root}/eval_b/queries.jsonl", f"{root}/eval_c/queries.jsonl"]
  os.remove(os.path.join(root, "eval_c", "queries.jsonl"))
  with pytest.raises(folder.DatasetError) as error:
    pipeline.load_splits(root, cache_dir=cache, skip_bad=True)
  assert error.value.problems == [f"{root}/eval_c/queries.jsonl: missing; a split folder needs "
                                  "items.jsonl and queries.jsonl (docs/DATA.md)"]
  shutil.rmtree(os.path.join(root, "eval_c"))
  splits = pipeline.load_splits(root, cache_dir=cache, skip_bad=True)
  assert list(splits) == ["train", "eval_a", "eval_b"]
  assert splits["eval_b"].query_ids == ["q1", "q2"] and len(splits["eval_b"].skipped) == 1


def _tree(root):
  return sorted((os.path.relpath(os.path.join(d, n), root), os.path.getmtime(os.path.join(d, n)))
                for d, _, names in os.walk(root) for n in names)


def test_read_only_dataset_needs_cache_dir_elsewhere(shop, tmp_path_factory):
  split_dir, root = shop
  before = _tree(root)
  modes = {path: os.stat(path).st_mode for path in (root, split_dir)}
  for path in modes:
    os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
  try:
    if os.access(root, os.W_OK):
      # Root ignores permissions: a file where the default cache folder goes blocks it.
      os.chmod(root, modes[root])
      open(os.path.join(root, ".cache"), "w").close()
      before = _tree(root)
      os.chmod(root, stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(folder.DatasetError) as error:
      pipeline.load_split(root, "shop")
    assert str(error.value).startswith(
        f"{root}/.cache: cannot write the ArrayRecord cache there (")
    assert str(error.value).endswith(
        "; pass --config.data.cache_dir=A_WRITABLE_FOLDER to keep it elsewhere")
    split = pipeline.load_split(root, "shop", cache_dir=str(tmp_path_factory.mktemp("elsewhere")))
    assert split.item_ids == ["a", "b", "c", "d"] and split.items[3]["item_id"] == b"d"
    assert _tree(root) == before
  finally:
    for path, mode in modes.items():
      os.chmod(path, mode)


def test_ingestion_prints_nothing_from_tfds(shop, capfd, caplog):
  split_dir, root = shop
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.INFO)
  try:
    with caplog.at_level("INFO"):
      ingest.ingest(root, "shop", cache_dir=os.path.join(root, "cache"))
    assert absl_logging.get_verbosity() == absl_logging.INFO
  finally:
    absl_logging.set_verbosity(verbosity)
  out, err = capfd.readouterr()
  logged = "\n".join(r.getMessage() for r in caplog.records)
  for text in (out, err, logged):
    assert "Downloading and preparing" not in text and "downloaded and prepared" not in text
    assert "Generating dataset" not in text and "examples/s" not in text
  assert "ingested" in logged  # INFO logs do reach caplog: the check above can fail.


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
