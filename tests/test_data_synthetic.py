"""Tests of the synthetic catalog writer (tigerfg_jax/data/synthetic.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from tigerfg_jax.data import synthetic

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tree_digest(root: str) -> str:
  digest = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _lines(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("catalog"))
  synthetic.write_catalog(root, seed=3, items=24, image_size=48)
  return root


def test_same_seed_gives_identical_files(catalog, tmp_path):
  again, other = str(tmp_path / "again"), str(tmp_path / "other")
  synthetic.write_catalog(again, seed=3, items=24, image_size=48)
  synthetic.write_catalog(other, seed=4, items=24, image_size=48)
  assert _tree_digest(again) == _tree_digest(catalog)
  assert _tree_digest(other) != _tree_digest(catalog)


def test_splits_titles_and_queries(catalog):
  for split, count in (("train", 24), ("eval_normal", 24), ("eval_cluttered", 24)):
    items = _lines(os.path.join(catalog, split, "items.jsonl"))
    queries = _lines(os.path.join(catalog, split, "queries.jsonl"))
    assert len(items) == count and len(queries) == count
    titles = [item["title"] for item in items]
    assert len(set(titles)) == len(titles)
    ids = {item["item_id"] for item in items}
    for item in items:
      words = set(item["title"].split())
      assert words & set(synthetic.COLOURS)
      assert any(kind in item["title"] for kind in synthetic.KINDS)
      with Image.open(os.path.join(catalog, split, item["image"])) as image:
        assert image.size == (48, 48)
    for query in queries:
      assert query["item_ids"] and set(query["item_ids"]) <= ids
      assert len(query["box"]) == 4
  assert synthetic.eval_split_items(400) == 100
  assert synthetic.eval_split_items(120) == 50
  assert synthetic.eval_split_items(24) == 24


def test_ids_are_unique_across_splits(tmp_path):
  synthetic.write_catalog(str(tmp_path), seed=1, items=9, image_size=16, one_to_many=True)
  item_ids, query_ids = [], []
  for split in synthetic.SPLITS:
    items = _lines(str(tmp_path / split / "items.jsonl"))
    queries = _lines(str(tmp_path / split / "queries.jsonl"))
    item_ids += [i["item_id"] for i in items]
    query_ids += [q["query_id"] for q in queries]
    own = {i["item_id"] for i in items}
    assert all(set(q["item_ids"]) <= own for q in queries)
  assert len(set(item_ids)) == len(item_ids) == 27  # eval splits default to all 9 here.
  assert len(set(query_ids)) == len(query_ids) == len(item_ids)


def test_normal_box_encloses_the_product(catalog):
  split_dir = os.path.join(catalog, "eval_normal")
  items = {item["item_id"]: item for item in _lines(os.path.join(split_dir, "items.jsonl"))}
  for query in _lines(os.path.join(split_dir, "queries.jsonl")):
    pixels = np.asarray(Image.open(os.path.join(split_dir, items[query["item_ids"][0]]["image"])),
                        np.int32)
    background = pixels[0, 0]
    differs = np.abs(pixels - background).sum(-1) > 0
    x0, y0, x1, y1 = query["box"]
    inside = differs[y0:y1, x0:x1]
    # The box is tight: the product touches each of its four sides.
    assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
    assert inside.mean() > 0.3
    far = np.ones_like(differs)
    far[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
    assert not differs[far].any()


def test_cluttered_target_size_and_distractors(catalog):
  split_dir = os.path.join(catalog, "eval_cluttered")
  for query in _lines(os.path.join(split_dir, "queries.jsonl")):
    x0, y0, x1, y1 = query["box"]
    assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
    cell = 48 / synthetic.CLUTTER_GRID  # the target fills 0.8-1.0 of one cell.
    assert cell * 0.45 <= max(x1 - x0, y1 - y0) <= cell + 1
  # Distractors come from the split's own products, half of them the target's kind.
  rng = np.random.default_rng(0)
  pool = synthetic.sample_products(rng, 40)
  target = pool[0]
  chosen = [p for _ in range(50) for p in synthetic._distractors(target, pool, rng)]
  assert all(p in pool and p != target for p in chosen)
  same_kind = np.mean([p.kind == target.kind for p in chosen])
  assert 0.3 < same_kind < 0.7


def test_one_to_many_positives_share_the_product(tmp_path):
  synthetic.write_catalog(str(tmp_path), seed=1, items=30, image_size=32, one_to_many=True,
                          title_pattern_prob=1.0)
  items = {i["item_id"]: i["title"] for i in _lines(str(tmp_path / "train" / "items.jsonl"))}
  queries = _lines(str(tmp_path / "train" / "queries.jsonl"))
  assert len(set(items.values())) == len(items)
  assert any(len(q["item_ids"]) > 1 for q in queries)

  def product_words(title):
    return [w for w in title.split() if w not in synthetic.LISTING_WORDS]

  for query in queries:
    described = {tuple(product_words(items[i])) for i in query["item_ids"]}
    assert len(described) == 1


def test_titles_name_the_pattern_as_often_as_asked(tmp_path):
  """Partial titles: colour and kind always; the pattern only with title_pattern_prob."""
  def titles(prob):
    out = tmp_path / str(prob)
    synthetic.write_catalog(str(out), seed=3, items=60, image_size=16,
                            title_pattern_prob=prob)
    return [i["title"] for i in _lines(str(out / "train" / "items.jsonl"))]

  full, short = titles(1.0), titles(0.0)
  assert len(set(short)) == len(short)  # unique even when many share colour and kind
  assert not any(" with " in t for t in short)
  assert sum(" with " in t for t in full) > len(full) // 2
  for long_title, short_title in zip(full, short):
    words = short_title.split(" model ")[0]
    assert long_title.startswith(words), (long_title, short_title)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "tigerfg_jax.data.synthetic", *args],
                        cwd=_REPO, capture_output=True, text=True, check=False)


def test_cli_writes_the_catalog_once(tmp_path):
  out = tmp_path / "cli"
  out.mkdir()  # An empty folder is taken.
  written = _cli(f"--out={out}", "--items=6", "--image_size=32", "--seed=2")
  assert written.returncode == 0, written.stderr
  direct = tmp_path / "direct"
  synthetic.write_catalog(str(direct), seed=2, items=6, image_size=32)
  os.remove(out / synthetic.CATALOG_MARKER)
  assert _tree_digest(str(out)) == _tree_digest(str(direct))
  synthetic.write_catalog_once(str(tmp_path / "once"), seed=2, items=6, image_size=32)
  digest = _tree_digest(str(tmp_path / "once"))
  # The same catalog again (eval_items spelled out): left as it is.
  again = _cli(f"--out={tmp_path / 'once'}", "--items=6", "--image_size=32", "--seed=2",
               "--eval_items=6")
  assert again.returncode == 0 and "already holds this catalog" in again.stdout
  assert _tree_digest(str(tmp_path / "once")) == digest
  # Other parameters: refused in one line naming the folder and both values, nothing mixed.
  other = _cli(f"--out={tmp_path / 'once'}", "--items=6", "--image_size=48", "--seed=2")
  assert other.returncode != 0 and "Traceback" not in other.stderr
  assert other.stderr.splitlines() == [
      f"error: {tmp_path / 'once'} holds a synthetic catalog written with image_size=32, not "
      f"image_size=48; use another folder, or delete {tmp_path / 'once'} to write the new one"]
  assert _tree_digest(str(tmp_path / "once")) == digest
  # A folder holding something else is refused too.
  (tmp_path / "user").mkdir()
  (tmp_path / "user" / "a.txt").write_text("x")
  foreign = _cli(f"--out={tmp_path / 'user'}", "--items=6", "--image_size=32")
  assert foreign.returncode != 0 and "has no synthetic.json" in foreign.stderr
  assert os.listdir(tmp_path / "user") == ["a.txt"]


def test_cli_prints_one_line_per_error(tmp_path):
  out = tmp_path / "bad"
  result = _cli(f"--out={out}", "--items=0", "--eval_items=-1", "--image_size=8")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
  assert "items=0" in lines[0] and "eval_items=-1" in lines[1] and "image_size=8" in lines[2]
  assert not out.exists()


def test_cli_help_matches_the_default_eval_items():
  result = _cli("--help")
  assert "max(items // 4, min(items, 50))" in " ".join(result.stdout.split())


@pytest.mark.parametrize("grid", [2, 3])
def test_clutter_grid_sets_the_target_size(tmp_path, grid):
  synthetic.write_catalog(str(tmp_path), seed=5, items=4, image_size=60, eval_items=12,
                          clutter_grid=grid)
  sides = [max(q["box"][2] - q["box"][0], q["box"][3] - q["box"][1])
           for q in _lines(str(tmp_path / "eval_cluttered" / "queries.jsonl"))]
  assert max(sides) <= 60 / grid + 1 and np.median(sides) >= 60 / grid * 0.6


def test_eval_items_sets_the_eval_split_size(tmp_path):
  synthetic.write_catalog(str(tmp_path), seed=2, items=9, image_size=16, eval_items=4)
  counts = {split: len(_lines(str(tmp_path / split / "items.jsonl")))
            for split in synthetic.SPLITS}
  assert counts == {"train": 9, "eval_normal": 4, "eval_cluttered": 4}
  with pytest.raises(synthetic.CatalogError, match="eval_items=0: each eval split"):
    synthetic.write_catalog(str(tmp_path / "bad"), seed=2, items=9, image_size=16,
                            eval_items=0)


@pytest.mark.parametrize("params, message", [
    (dict(items=0), "items=0: the train split needs at least 1 item"),
    (dict(eval_items=-3), "eval_items=-3:"),
    (dict(image_size=12), "image_size=12: too small"),
    (dict(image_size=20, clutter_grid=3), "image_size=20: too small; need at least 16 and "
     "8 px per cell of the 3 x 3 clutter grid (24 px)"),
    (dict(clutter_grid=1), "clutter_grid=1:"),
    (dict(seed=-1), "seed=-1:"),
    (dict(title_pattern_prob=1.5), "title_pattern_prob=1.5:"),
])
def test_impossible_sizes_are_refused_before_writing(tmp_path, params, message):
  out = tmp_path / "out"
  with pytest.raises(synthetic.CatalogError) as error:
    synthetic.write_catalog(str(out), **dict(dict(seed=0, items=4, image_size=16), **params))
  assert str(error.value).splitlines() == [str(error.value).splitlines()[0]]
  assert message in str(error.value)
  assert not out.exists()


def test_write_catalog_refuses_a_non_empty_folder(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(synthetic.CatalogError, match=f"{tmp_path}: not empty"):
    synthetic.write_catalog(str(tmp_path), seed=0, items=2, image_size=16)
  assert os.listdir(tmp_path) == ["notes.txt"]


def test_catalog_root_writes_once_and_checks_params(tmp_path):
  config = ml_collections.ConfigDict(dict(root=None, synthetic_items=6, synthetic_seed=0,
                                          synthetic_image_size=32, synthetic_eval_items=3,
                                          synthetic_clutter_grid=2, synthetic_text_eval_items=0))
  root = synthetic.catalog_root(config, str(tmp_path))
  assert root == str(tmp_path / "data")
  assert len(_lines(os.path.join(root, "eval_normal", "items.jsonl"))) == 3
  marker_time = os.path.getmtime(os.path.join(root, "train", "items.jsonl"))
  assert synthetic.catalog_root(config, str(tmp_path)) == root
  assert os.path.getmtime(os.path.join(root, "train", "items.jsonl")) == marker_time
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".data-")]
  config.synthetic_items = 7
  with pytest.raises(synthetic.CatalogError) as error:
    synthetic.catalog_root(config, str(tmp_path))
  assert str(error.value) == (
      f"{root} holds a synthetic catalog written with items=6, not items=7; use another "
      f"folder, or delete {root} to write the new one")
  config.root = "/some/user/root"
  assert synthetic.catalog_root(config, str(tmp_path)) == "/some/user/root"
