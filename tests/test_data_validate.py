"""Tests of the dataset validator CLI (tigerfg_jax/data/validate.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from PIL import Image

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _split(root, name, *, boxes, bad_box=False, empty_queries=False):
  """A split of 3 items and 3 queries; the first `boxes` queries have a box."""
  split = os.path.join(root, name)
  os.makedirs(split)
  items, queries = [], []
  for i in range(3):
    Image.new("RGB", (20, 10), (60 * i, 0, 0)).save(os.path.join(split, f"i{i}.png"))
    Image.new("RGB", (8, 8), (0, 60 * i, 0)).save(os.path.join(split, f"q{i}.png"))
    items.append({"item_id": f"{name}-{i}", "image": f"i{i}.png", "title": f"thing {i}"})
    box = [1, 1, 5, 5] if i < boxes else None
    queries.append({"query_id": f"q{i}", "image": f"q{i}.png", "item_ids": [f"{name}-{i}"],
                    "box": box})
  if bad_box:
    queries[0]["box"] = [0, 0, 30, 5]  # past the 20 px wide item image.
  with open(os.path.join(split, "items.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(line) + "\n" for line in items)
  with open(os.path.join(split, "queries.jsonl"), "w", encoding="utf-8") as f:
    if not empty_queries:
      f.writelines(json.dumps(line) + "\n" for line in queries)


def _tree(root):
  return sorted((os.path.relpath(os.path.join(d, n), root), os.stat(os.path.join(d, n)).st_mtime_ns)
                for d, dirs, names in os.walk(root) for n in names + dirs)


def _validate(*args):
  return subprocess.run([sys.executable, "-m", "tigerfg_jax.data.validate", *args], cwd=_REPO,
                        capture_output=True, text=True, check=False)


def test_valid_folder_summary_and_nothing_written(tmp_path):
  root = str(tmp_path / "data")
  _split(root, "train", boxes=2)
  _split(root, "eval_x", boxes=0)
  before = _tree(root)
  result = _validate(f"--root={root}")
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.splitlines() == [
      "train: 3 items, 3 queries (2 with a box, 1 without), 0 text queries, 0 bad record(s)",
      "eval_x: 3 items, 3 queries (0 with a box, 3 without), 0 text queries, 0 bad record(s)",
      f"{root}: valid (2 split(s): train, eval_x)"]
  assert _tree(root) == before


def test_problems_of_every_split_are_listed(tmp_path):
  root = str(tmp_path / "data")
  _split(root, "train", boxes=3)
  _split(root, "eval_a", boxes=3, bad_box=True)
  _split(root, "eval_b", boxes=1, empty_queries=True)
  before = _tree(root)
  result = _validate(f"--root={root}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  lines = result.stdout.splitlines()
  box_problem = (f"  {root}/eval_a/queries.jsonl:1: box [0, 0, 30, 5] must satisfy "
                 "0 <= x0 < x1 <= 20 and 0 <= y0 < y1 <= 10 (the image of item_ids[0])")
  assert lines == [
      "train: 3 items, 3 queries (3 with a box, 0 without), 0 text queries, 0 bad record(s)",
      "eval_a: 3 items, 2 queries (2 with a box, 0 without), 0 text queries, 1 bad record(s)",
      f"  1 problem(s) in {root}/eval_a (--config.data.skip_bad=true skips the bad records):",
      box_problem,
      "eval_b: cannot be read",
      f"  {root}/eval_b/queries.jsonl: file is empty; expected one JSON object per line "
      "(docs/DATA.md)",
      f"{root}: INVALID (2 of 3 split(s): eval_a, eval_b)"]
  # With --skip_bad the bad box is skipped; the empty file still fails the folder.
  skipped = _validate(f"--root={root}", "--skip_bad")
  assert skipped.returncode == 1
  assert ("eval_a: 3 items, 2 queries (2 with a box, 0 without), 0 text queries, "
          "1 bad record(s) skipped") in skipped.stdout.splitlines()
  assert box_problem.replace("  ", "  skipped: ", 1) in skipped.stdout.splitlines()
  shutil.rmtree(os.path.join(root, "eval_b"))
  assert _validate(f"--root={root}", "--skip_bad").returncode == 0
  assert _validate(f"--root={root}").returncode == 1
  assert not os.path.exists(os.path.join(root, ".cache"))
  assert _tree(root) == [t for t in before if not t[0].startswith("eval_b")]


def test_missing_root_and_help(tmp_path):
  missing = _validate(f"--root={tmp_path / 'nope'}")
  assert missing.returncode == 1
  assert missing.stdout.strip() == f"{tmp_path / 'nope'}: dataset folder does not exist"
  helped = _validate("--help")
  assert helped.returncode == 0
  assert "--root" in helped.stdout and "--[no]skip_bad" in helped.stdout
  assert _validate().returncode != 0  # --root is required.


def test_import_defines_no_flags():
  code = ("from absl import flags; import tigerfg_jax.data.validate as v; "
          "print('root' in flags.FLAGS, 'skip_bad' in flags.FLAGS, callable(v.run))")
  result = subprocess.run([sys.executable, "-c", code], cwd=_REPO, capture_output=True,
                          text=True, check=True)
  assert result.stdout.split() == ["False", "False", "True"]
