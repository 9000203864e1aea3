"""Text queries end to end: the stage's config rules, the t2i / t2modal terms against a
NumPy reference, a micro text_query run (SMAR fusion) and a micro joint run with their
`<split>/text` rows recomputed by brute force, and the export answering typed queries."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests import train_helpers
from tigerfg_jax import config_lib
from tigerfg_jax.data import synthetic
from tigerfg_jax.evaluation import retrieval, text_hits
from tigerfg_jax.experiments import text_query_table
from tigerfg_jax.serving import artifact
from tigerfg_jax.serving import export
from tigerfg_jax.serving import search
from tigerfg_jax.training import step as step_lib
from tigerfg_jax.training import trainer

SPLIT = "eval_cluttered"


# ----------------------------------------------------------------------- config ---

@pytest.mark.parametrize("stage, overrides, message", [
    ("text_query", {"loss.w_q2i": 1.0}, "config.loss.w_q2i must be 0"),
    ("text_query", {"loss.w_t2i": 0.0, "loss.w_t2modal": 0.0}, "set config.loss.w_t2i > 0"),
    ("distill", {"model.item_fusion": "smar"}, "config.model.item_fusion='smar'"),
    ("clip_style", {"loss.w_t2i": 1.0}, "needs a text query tower"),
    ("text_query", {"model.item_fusion": "image", "model.text_query_encoder": "title"},
     "has none: use 'own'"),
])
def test_config_rules_name_the_key(stage, overrides, message):
  config = train_helpers.micro_config(stage, **overrides)
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate(config)


def test_text_query_config_is_valid_for_every_fusion():
  for fusion in ("text", "image", "concat", "beyond_text", "smar", "tiger"):
    config_lib.validate(train_helpers.micro_config("text_query",
                                                   **{"model.item_fusion": fusion}))


# ------------------------------------------------------------------------ terms ---

def _reference_infonce(q, k, tau, positives, valid):
  """Symmetric multi-positive InfoNCE, float64, one row at a time."""
  logits = q.astype(np.float64) @ k.astype(np.float64).T / tau
  directions = []
  for scores, pos in ((logits, positives), (logits.T, positives.T)):
    losses = []
    for r in range(len(scores)):
      if not valid[r]:
        continue
      cands = [c for c in range(len(scores)) if valid[c]]
      hits = [c for c in cands if pos[r, c]]
      if not hits:
        continue
      top = max(scores[r, c] for c in cands)
      log_all = top + np.log(sum(np.exp(scores[r, c] - top) for c in cands))
      log_pos = top + np.log(sum(np.exp(scores[r, c] - top) for c in hits))
      losses.append(log_all - log_pos)
    directions.append(np.mean(losses))
  return np.mean(directions)


def _unit(rng, shape):
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_text_terms_match_numpy_reference():
  rng = np.random.default_rng(0)
  b, e = 8, 16
  # Row r's item is item r; its text query lists its own item and 0-2 others (-1 pads).
  relevant = np.full((b, 3), -1, np.int32)
  relevant[:, 0] = np.arange(b)
  for r in range(b):
    others = rng.choice([c for c in range(b) if c != r], size=rng.integers(0, 3),
                        replace=False)
    relevant[r, 1:1 + len(others)] = others
  valid = np.array([True] * 6 + [False] * 2)
  positives = np.zeros((b, b), bool)
  for r in range(b):
    positives[r, [c for c in relevant[r] if c >= 0]] = valid[r]
  student = {name: _unit(rng, (b, e)) for name in (
      "text_query_emb", "text_query_unit", "item_emb", "item_text_emb", "item_image_emb")}
  student["temperature"] = np.float32(0.1)
  batch = {"text_relevant": relevant, "item_row": np.arange(b, dtype=np.int32),
           "text_valid": valid, "group": np.arange(b, dtype=np.int32)}
  np.testing.assert_array_equal(step_lib.text_positives(batch), positives)
  loss_config = config_lib.experiment_config("text_query", "micro").loss
  terms = step_lib.loss_terms(student, {}, batch, loss_config)
  assert set(terms) == {"t2i", "t2modal"}
  np.testing.assert_allclose(
      terms["t2i"], _reference_infonce(student["text_query_emb"], student["item_emb"], 0.1,
                                       positives, valid), rtol=1e-5)
  expected = np.mean([_reference_infonce(student["text_query_unit"], student[k], 0.1,
                                         positives, valid)
                      for k in ("item_text_emb", "item_image_emb")])
  np.testing.assert_allclose(terms["t2modal"], expected, rtol=1e-5)
  # A fusion without modality embeddings has no t2modal term.
  plain = {k: v for k, v in student.items() if k not in ("item_text_emb", "item_image_emb")}
  assert set(step_lib.loss_terms(plain, {}, batch, loss_config)) == {"t2i"}


# -------------------------------------------------------------------- the runs ---

def _brute_force(workdir, split_root, split):
  """R@10 / NDCG@10 of the split's text queries from the saved embeddings, by hand."""
  items = np.load(os.path.join(workdir, "eval", f"{split}_item_emb.npy"))
  texts = np.load(os.path.join(workdir, "eval", f"{split}_text_query_emb.npy"))
  ids = [json.loads(line)["item_id"]
         for line in open(os.path.join(split_root, split, "items.jsonl"))]
  queries = [json.loads(line)
             for line in open(os.path.join(split_root, split, "text_queries.jsonl"))]
  assert len(texts) == len(queries)
  hits, ndcg = [], []
  for emb, query in zip(texts, queries):
    ranked = [ids[i] for i in np.argsort(-(items @ emb), kind="stable")[:10]]
    relevant = set(query["item_ids"])
    hits.append(any(i in relevant for i in ranked))
    dcg = sum(1 / np.log2(r + 2) for r, i in enumerate(ranked) if i in relevant)
    ideal = sum(1 / np.log2(r + 2) for r in range(min(len(relevant), 10)))
    ndcg.append(dcg / ideal)
  return 100 * np.mean(hits), 100 * np.mean(ndcg)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("text_catalog"))
  synthetic.write_catalog(root, seed=0, items=24, image_size=32)
  return root


@pytest.fixture(scope="module")
def smar_run(catalog, tmp_path_factory):
  config = train_helpers.micro_config("text_query", **{
      "model.item_fusion": "smar", "data.root": catalog, "eval.backend": "exact",
      "train.steps": 4})
  workdir = str(tmp_path_factory.mktemp("smar_run"))
  results = trainer.train_and_evaluate(config, workdir)
  return workdir, results


def test_text_query_run_reports_text_rows_only(smar_run, catalog):
  workdir, results = smar_run
  assert all(name.endswith(retrieval.TEXT_ROW) for name in results)
  row = results[SPLIT + retrieval.TEXT_ROW]
  assert set(row) >= {"R@1", "R@10", "R@50", "NDCG@10", "mAP@10"}
  recall, ndcg = _brute_force(workdir, catalog, SPLIT)
  assert row["R@10"] == pytest.approx(recall)
  assert row["NDCG@10"] == pytest.approx(ndcg)
  # SMAR's searched vectors are [multimodal, text]: twice the embedding width.
  items = np.load(os.path.join(workdir, "eval", f"{SPLIT}_item_emb.npy"))
  assert items.shape[1] == 2 * config_lib.experiment_config("text_query", "micro"
                                                            ).model.embed_dim
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("t2i" in r and "t2modal" in r and "q2i" not in r for r in logged)


def test_text_only_export_answers_text_and_refuses_images(smar_run, catalog, tmp_path):
  workdir, _ = smar_run
  out = str(tmp_path / "export")
  export.export_run(workdir, out, split=SPLIT, platforms=["cpu"])
  model = artifact.load(out)
  assert model.query_kinds == ("text",)
  query = json.loads(open(os.path.join(catalog, SPLIT, "text_queries.jsonl")).readline())
  lines = search.answer(out, None, 3, None, text=query["text"])
  items = np.load(os.path.join(workdir, "eval", f"{SPLIT}_item_emb.npy"))
  texts = np.load(os.path.join(workdir, "eval", f"{SPLIT}_text_query_emb.npy"))
  expected = [model.item_ids[i] for i in np.argsort(-(items @ texts[0]), kind="stable")[:3]]
  assert [line.split()[1] for line in lines] == expected
  with pytest.raises(artifact.ExportError, match="not image queries"):
    model.embed_query(np.zeros((1, 32, 32, 3), np.uint8))


def test_joint_run_answers_both_kinds_from_one_index(catalog, tmp_path):
  config = config_lib.apply_overrides(
      train_helpers.micro_config("distill"),
      {**train_helpers.NO_TEACHER, "loss.w_t2i": 1.0, "model.text_query_encoder": "own",
       "data.root": catalog, "eval.backend": "exact", "train.steps": 3})
  workdir = str(tmp_path / "joint")
  results = trainer.train_and_evaluate(config, workdir)
  assert {SPLIT, SPLIT + retrieval.TEXT_ROW} <= set(results)
  recall, _ = _brute_force(workdir, catalog, SPLIT)
  assert results[SPLIT + retrieval.TEXT_ROW]["R@10"] == pytest.approx(recall)
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert any("t2i" in r and "q2i" in r for r in logged)
  out = str(tmp_path / "export")
  export.export_run(workdir, out, split=SPLIT, platforms=["cpu"])
  model = artifact.load(out)
  assert model.query_kinds == ("image", "text")
  # Both query kinds, served from the export, embed as the evaluator embedded them.
  split_dir = os.path.join(catalog, SPLIT)
  image_query = json.loads(open(os.path.join(split_dir, "queries.jsonl")).readline())
  text_query = json.loads(open(os.path.join(split_dir, "text_queries.jsonl")).readline())
  image = artifact.load_image(os.path.join(split_dir, image_query["image"]),
                              model.query_image_size)
  saved = {kind: np.load(os.path.join(workdir, "eval", f"{SPLIT}_{kind}_emb.npy"))
           for kind in ("query", "text_query")}
  np.testing.assert_allclose(model.embed_query(image[None])[0], saved["query"][0],
                             atol=1e-5)
  np.testing.assert_allclose(model.embed_text_queries([text_query["text"]])[0],
                             saved["text_query"][0], atol=1e-5)


def test_text_hits_picture_shows_the_scored_ranking(smar_run, catalog, tmp_path):
  workdir, _ = smar_run
  out = str(tmp_path / "hits.png")
  relevant = text_hits.visualize([workdir, workdir], SPLIT, 3, out, k=4, cell=32)
  items = np.load(os.path.join(workdir, "eval", f"{SPLIT}_item_emb.npy"))
  texts = np.load(os.path.join(workdir, "eval", f"{SPLIT}_text_query_emb.npy"))
  ids = [json.loads(line)["item_id"]
         for line in open(os.path.join(catalog, SPLIT, "items.jsonl"))]
  queries = [json.loads(line)
             for line in open(os.path.join(catalog, SPLIT, "text_queries.jsonl"))][:3]
  expected = [[ids[i] in q["item_ids"] for i in np.argsort(-(items @ t), kind="stable")[:4]]
              for t, q in zip(texts, queries)]
  np.testing.assert_array_equal(relevant, [expected, expected])
  with Image.open(out) as image:
    assert image.width > 4 * 32 and image.height > 3 * 2 * 32


def test_text_query_table_report_compares_with_text_only():
  def run(r10):
    row = {"R@1": 1.0, "R@10": r10, "R@50": 90.0, "NDCG@10": 5.0, "mAP@10": 4.0}
    return {"results": {f"{s}{retrieval.TEXT_ROW}": row
                        for s in text_query_table.TEXT_SPLITS}}
  report = {
      "preset": "tiny", "command": "cmd", "date": "d", "seeds": [0, 1],
      "hardware": {"cpu": "cpu", "cores": 2, "jax_version": "x"},
      "rows": [{"key": "text", "label": "text-only", "runs": {"0": run(70.0), "1": run(72.0)}},
               {"key": "smar", "label": "SMAR", "runs": {"0": run(75.0), "1": run(79.0)}},
               {"key": "joint", "label": "joint", "runs": {"0": run(50.0)}}],
  }
  text = text_query_table.format_report(report, "r.json")
  smar = [line for line in text.splitlines() if line.startswith("| SMAR |")]
  # Mean 77 against 71: +6; the std of (75, 79) is 2.83.
  assert smar and all(line.endswith("| +6.00 |") and "77.00 ± 2.83" in line for line in smar)
  assert "| joint [0] |" in text
