"""Text queries in the data format: validation of text_queries.jsonl, the synthetic
catalog's queries, the train batches' text keys (against brute force), and resumption."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from tigerfg_jax import config_lib
from tigerfg_jax.data import folder, pipeline, synthetic, synthetic_text
from tigerfg_jax.data import text_queries as text_queries_lib
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.training import step as step_lib

SIZE, PATCH, BATCH, MAX_LEN = 32, 8, 8, 16


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("catalog"))
  synthetic.write_catalog(path, seed=0, items=40, image_size=32)
  return path


@pytest.fixture(scope="module")
def split(root, tmp_path_factory):
  return pipeline.load_split(root, "train", cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tokenizer(split):
  return TitleTokenizer.train(split.titles + split.text_queries, 128)


def _lines(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------- validation ---

def _with_text_queries(root, tmp_path, lines):
  copy = str(tmp_path / "data")
  shutil.copytree(root, copy, ignore=shutil.ignore_patterns(".cache"))
  with open(os.path.join(copy, "train", folder.TEXT_QUERIES_FILE), "w") as f:
    f.writelines(line + "\n" for line in lines)
  return copy


def test_bad_lines_name_file_and_line(root, tmp_path):
  item = _lines(os.path.join(root, "train", "items.jsonl"))[0]["item_id"]
  good = json.dumps({"query_id": "t0", "text": "red mug", "item_ids": [item]})
  copy = _with_text_queries(root, tmp_path, [
      good,
      "{not json",
      json.dumps({"query_id": "t1", "text": "", "item_ids": [item]}),
      json.dumps({"query_id": "t2", "text": "mug", "item_ids": []}),
      json.dumps({"query_id": "t3", "text": "mug", "item_ids": ["no-such-item"]}),
      json.dumps({"query_id": "t0", "text": "mug", "item_ids": [item]}),
  ])
  path = os.path.join(copy, "train", folder.TEXT_QUERIES_FILE)
  with pytest.raises(folder.DatasetError) as error:
    folder.read_split(copy, "train")
  problems = error.value.problems
  assert len(problems) == 5
  for line, words in ((2, "bad JSON"), (3, "'text' must be a non-empty string"),
                      (4, "'item_ids' must be a non-empty list"),
                      (5, "'no-such-item' is not in items.jsonl"),
                      (6, "duplicate query_id 't0'")):
    assert any(p.startswith(f"{path}:{line}:") and words in p for p in problems), words
  records = folder.read_split(copy, "train", skip_bad=True)
  assert [q.query_id for q in records.text_queries] == ["t0"]
  assert len(records.skipped) == 5


def test_empty_text_query_file_is_refused_and_a_missing_one_is_fine(root, tmp_path):
  copy = _with_text_queries(root, tmp_path, [])
  with pytest.raises(folder.DatasetError, match="text_queries.jsonl: file is empty"):
    folder.read_split(copy, "train")
  os.remove(os.path.join(copy, "train", folder.TEXT_QUERIES_FILE))
  assert folder.read_split(copy, "train").text_queries == []


# -------------------------------------------------------------------- synthetic ---

def test_synthetic_relevant_sets_are_closed_and_share_the_kind():
  """Hand-made products: every item of a listed product is listed; all share the kind
  named in the text; each query lists the product it was made from."""
  P = synthetic.Product
  products = [P("mug", "red", "stripes", "blue"), P("mug", "red", "stripes", "white"),
              P("mug", "red", "plain", None), P("hat", "red", "stripes", "blue"),
              P("mug", "blue", "dots", "red")]
  product_of_item = [0, 1, 2, 3, 4, 0, 2, 1]
  ids = [f"i{k}" for k in range(len(product_of_item))]
  lines = synthetic_text.text_queries("s", products, product_of_item, ids,
                                      np.random.default_rng(0))
  for line in lines:
    listed = {int(i[1:]) for i in line["item_ids"]}
    kinds = {products[product_of_item[i]].kind for i in listed}
    assert len(kinds) == 1 and kinds.pop() in line["text"]
    listed_products = {product_of_item[i] for i in listed}
    assert listed == {i for i, p in enumerate(product_of_item) if p in listed_products}
  # One query per product unless its text repeats an earlier one.
  assert len(lines) == len({line["text"] for line in lines}) <= len(products)


def test_synthetic_catalog_writes_text_queries_for_every_split(root):
  for split_name in synthetic.SPLITS:
    lines = _lines(os.path.join(root, split_name, folder.TEXT_QUERIES_FILE))
    items = {line["item_id"] for line in _lines(os.path.join(root, split_name,
                                                             "items.jsonl"))}
    assert lines and all(set(line["item_ids"]) <= items for line in lines)
  names_pattern = [line for line in lines
                   if any(w in line["text"] for w in ("strip", "dot", "check", "plain"))]
  assert len(names_pattern) > len(lines) / 2


# ---------------------------------------------------------------------- batches ---

def _data_config():
  config = config_lib.experiment_config("teacher", "micro").data
  config.item_image_size = config.query_image_size = SIZE
  config.mosaic_max_products = 4
  return config


def _batches(split, tokenizer, count, text_queries=True, state=None):
  iterator = pipeline.train_iterator(split, tokenizer, _data_config(), batch_size=BATCH,
                                     patch_size=PATCH, max_title_len=MAX_LEN, seed=0,
                                     text_queries=text_queries, max_query_len=MAX_LEN)
  if state is not None:
    iterator.set_state(state)
  return iterator, [next(iterator) for _ in range(count)]


def test_text_positives_match_brute_force(split, tokenizer):
  tokens, _ = tokenizer.encode(split.text_queries, MAX_LEN)
  _, batches = _batches(split, tokenizer, 3)
  for batch in batches:
    positives = np.asarray(step_lib.text_positives(batch))
    for i in range(BATCH):
      if not batch["text_valid"][i]:
        assert not positives[i].any() and not batch["text_mask"][i].any()
        assert not any(batch["item_row"][i] in rows for rows in split.text_query_positives)
        continue
      # The query drawn: one with these tokens that lists this row's item.
      drawn = [t for t in range(len(tokens))
               if np.array_equal(tokens[t], batch["text_tokens"][i])
               and batch["item_row"][i] in split.text_query_positives[t]]
      assert drawn
      expected = [batch["item_row"][j] in split.text_query_positives[drawn[0]]
                  for j in range(BATCH)]
      np.testing.assert_array_equal(positives[i], expected)


def test_an_items_text_queries_are_drawn_by_inverse_relevant_count(tokenizer):
  # An item's queries are drawn in proportion to 1 / |relevant| (data/text_queries.py).
  positives = [[0, 1, 2], [1], [0, 1, 2, 3]]
  table = text_queries_lib.TextQueryTable.build(
      ["red mug", "red mug with blue stripes", "mug"], positives, 5, tokenizer, MAX_LEN)
  rng = np.random.default_rng(0)
  for row, queries in ((1, [0, 1, 2]), (0, [0, 2]), (3, [2])):
    drawn = table.sample(np.full(20_000, row), rng)
    assert drawn["text_valid"].all()
    sets = [sorted(r for r in rel if r >= 0) for rel in drawn["text_relevant"]]
    frequencies = [np.mean([rel == positives[t] for rel in sets]) for t in queries]
    weights = np.asarray([1.0 / len(positives[t]) for t in queries])
    np.testing.assert_allclose(frequencies, weights / weights.sum(), atol=0.012)
  assert not table.sample(np.asarray([4]), rng)["text_valid"].any()


def test_text_keys_leave_the_rest_of_the_batch_unchanged_and_resume(split, tokenizer):
  iterator, with_text = _batches(split, tokenizer, 3)
  _, without = _batches(split, tokenizer, 3, text_queries=False)
  text_keys = {"text_tokens", "text_mask", "text_valid", "text_relevant", "item_row"}
  for a, b in zip(with_text, without):
    assert set(a) - set(b) == text_keys
    for key in b:
      np.testing.assert_array_equal(a[key], b[key])
  state = iterator.get_state()
  following = next(iterator)
  _, resumed = _batches(split, tokenizer, 1, state=state)
  for key in following:
    np.testing.assert_array_equal(following[key], resumed[0][key])


def test_eval_text_batches_in_file_order(split, tokenizer):
  tokens, mask = tokenizer.encode(split.text_queries, MAX_LEN)
  batches = list(pipeline.eval_text_query_batches(split, tokenizer, batch_size=BATCH,
                                                  max_query_len=MAX_LEN))
  assert len(batches) == -(-len(tokens) // BATCH)
  rows = np.concatenate([b["index"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(rows, np.arange(len(tokens)))
  stacked = np.concatenate([b["text_tokens"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(stacked, tokens)
  assert not batches[-1]["text_mask"][~batches[-1]["valid"]].any()


def test_eval_text_split_and_old_catalogs(tmp_path):
  root = str(tmp_path / "catalog")
  synthetic.write_catalog_once(root, seed=0, items=24, image_size=32, text_eval_items=30)
  assert folder.split_names(root) == ["train", "eval_cluttered", "eval_normal", "eval_text"]
  records = folder.read_split(root, synthetic.TEXT_EVAL_SPLIT)
  assert len(records.items) == 30 and records.text_queries
  # A catalog written before text queries (its marker has no version) is refused.
  marker = os.path.join(root, synthetic.CATALOG_MARKER)
  with open(marker) as f:
    params = json.load(f)
  del params["version"]
  with open(marker, "w") as f:
    json.dump(params, f)
  with pytest.raises(synthetic.CatalogError, match="version=1"):
    synthetic.write_catalog_once(root, seed=0, items=24, image_size=32, text_eval_items=30)
