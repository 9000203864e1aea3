"""Export and search: a micro run trained for 3 steps, exported once, then served.

Checks that the exported encoders compute what the in-process model computes, that a
search over the export ranks as the evaluator did, that a damaged export is refused,
and the search CLI (plain and with --items) in subprocesses.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import train_helpers
from tigerfg_jax import config_lib
from tigerfg_jax import index
from tigerfg_jax import sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import folder
from tigerfg_jax.data import synthetic
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.models import towers
from tigerfg_jax.serving import export
from tigerfg_jax.serving import artifact
from tigerfg_jax.serving import search
from tigerfg_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLIT = export.DEFAULT_SPLIT
HIT_LINE = re.compile(r"^(\d+) (\S+) (-?\d+\.\d+) (.+)$")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, data root, export dir) of a 3-step micro run and its export."""
  base = tmp_path_factory.mktemp("export")
  root = str(base / "catalog")
  synthetic.write_catalog(root, seed=0, items=24, image_size=32)
  config = config_lib.experiment_config("distill", "micro")
  config_lib.apply_overrides(config, train_helpers.NO_TEACHER)  # this is about the export.
  config.train.steps = 3
  config.data.root = root
  workdir = str(base / "run")
  trainer.train_and_evaluate(config, workdir)
  out = str(base / "exported")
  export.export_run(workdir, out, split=SPLIT)
  return workdir, root, out


@pytest.fixture(scope="module")
def served(run):
  return artifact.load(run[2])


@pytest.fixture(scope="module")
def in_process(run):
  """The trained model and its final params, restored from the whole train state
  (the trainer's own restore path, not the params-only one the export uses)."""
  workdir = run[0]
  config = workdir_lib.load_config(workdir)
  vocab = TitleTokenizer.load(os.path.join(workdir, workdir_lib.TOKENIZER_FILE)).vocab_size
  built = trainer.make_trainer(config, sharding.make_mesh(config.mesh), vocab)
  manager = workdir_lib.checkpoint_manager(workdir)
  state, _ = workdir_lib.restore_checkpoint(manager, manager.latest_step(),
                                            built.abstract_state)
  return built.model, jax.device_get(state.params)


def _subprocess(args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)


def _split_records(root):
  return folder.read_split(root, SPLIT)


@pytest.mark.parametrize("batch", [1, 7])
def test_exported_encoders_equal_the_in_process_model(served, in_process, batch,
                                                      monkeypatch):
  # Chunks of 4 rows: a batch of 7 goes through the chunked, zero-padded path.
  monkeypatch.setattr(artifact, "EMBED_BATCH", 4)
  model, params = in_process
  rng = np.random.default_rng(batch)
  sq, si = served.query_image_size, served.item_image_size
  queries = rng.integers(0, 256, (batch, sq, sq, 3), np.uint8)
  items = rng.integers(0, 256, (batch, si, si, 3), np.uint8)
  titles = ["red round handbag with blue dots", "mug", "green striped shirt large",
            "lamp", "a b c d e f g h i j k l m n o p q r s", "hat hat", "box"][:batch]
  tokens, mask = served.encode_titles(titles)

  variables = {"params": params}
  want_query = jax.jit(functools.partial(model.apply, method=towers.TigerFG.embed_query))(
      variables, queries)
  want_item, _ = jax.jit(functools.partial(model.apply, method=towers.TigerFG.embed_item))(
      variables, items, tokens, mask)
  got_query = served.embed_query(queries)
  got_item = served.embed_items(items, tokens, mask)
  assert got_query.shape == got_item.shape == (batch, served.embed_dim)
  np.testing.assert_allclose(got_query, np.asarray(want_query), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_item, np.asarray(want_item), rtol=1e-5, atol=1e-6)
  # The titles matter: the same images with other titles embed differently.
  other, other_mask = served.encode_titles(["purple umbrella"] * batch)
  assert np.abs(served.embed_items(items, other, other_mask) - got_item).max() > 1e-4


def test_catalog_is_the_evaluators(run, served):
  workdir, root, _ = run
  records = _split_records(root)
  assert served.item_ids == [r.item_id for r in records.items]
  assert served.titles == [r.title for r in records.items]
  saved = np.load(os.path.join(workdir, "eval", f"{SPLIT}_item_emb.npy"))
  np.testing.assert_allclose(served.index.embeddings, saved, rtol=1e-5, atol=1e-6)
  assert served.index.backend == "scann"


def test_search_ranks_like_the_evaluator(run, served):
  workdir, root, _ = run
  records = _split_records(root)
  config = workdir_lib.load_config(workdir)
  saved_items = np.load(os.path.join(workdir, "eval", f"{SPLIT}_item_emb.npy"))
  saved_queries = np.load(os.path.join(workdir, "eval", f"{SPLIT}_query_emb.npy"))
  # The evaluator's search: its index over row numbers, its config.
  rows, _ = index.build(saved_items, np.arange(len(saved_items)), config.eval).search(
      saved_queries, 10)
  want = np.asarray(served.item_ids)[rows]

  images = served.load_images(
      [os.path.join(records.directory, q.image) for q in records.queries], "query")
  np.testing.assert_allclose(served.embed_query(images), saved_queries, rtol=1e-5,
                             atol=1e-6)
  got, scores = served.search(images, 10)
  np.testing.assert_array_equal(got, want)
  # Scores are the cosine similarities of the returned items, best first.
  by_id = dict(zip(served.item_ids, saved_items))
  expected = np.einsum("qe,qke->qk", saved_queries.astype(np.float64),
                       np.stack([[by_id[i] for i in row] for row in got]).astype(np.float64))
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
  assert (np.diff(scores, axis=1) <= 0).all()


def test_manifest_lists_every_file_with_its_hash(run):
  out = run[2]
  with open(os.path.join(out, artifact.MANIFEST)) as f:
    manifest = json.load(f)
  on_disk = sorted(os.path.relpath(os.path.join(d, n), out)
                   for d, _, names in os.walk(out) for n in names)
  assert sorted(manifest["files"]) == [p for p in on_disk if p != artifact.MANIFEST]
  for relative, entry in manifest["files"].items():
    with open(os.path.join(out, relative), "rb") as f:
      data = f.read()
    assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
  assert manifest["versions"]["jax"] == jax.__version__
  assert manifest["source"]["checkpoint_step"] == 3
  assert manifest["source"]["catalog_split"] == SPLIT


@pytest.mark.parametrize("damage,relative,message", [
    ("truncate", artifact.QUERY_ENCODER, "truncated"),
    ("flip", os.path.join(artifact.INDEX_DIR, "embeddings.npy"), "sha256"),
    ("flip", artifact.CATALOG, "sha256"),
    ("delete", artifact.TOKENIZER, "missing"),
])
def test_damaged_export_is_refused(run, tmp_path, damage, relative, message):
  copy = str(tmp_path / "copy")
  shutil.copytree(run[2], copy)
  path = os.path.join(copy, relative)
  if damage == "truncate":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif damage == "flip":
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) - 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 1]))
  else:
    os.remove(path)
  with pytest.raises(artifact.ExportError, match=message) as error:
    artifact.load(copy)
  assert path in str(error.value)


def test_bad_inputs_get_clear_errors(run, served, tmp_path):
  workdir, _, out = run
  with pytest.raises(artifact.ExportError, match="no such export directory"):
    artifact.load(str(tmp_path / "missing"))
  corrupt = str(tmp_path / "corrupt.jpg")
  with open(corrupt, "wb") as f:
    f.write(b"not an image")
  with pytest.raises(ValueError, match=re.escape(corrupt) + ": cannot decode"):
    search.search_lines(served, corrupt, 3)
  with pytest.raises(FileNotFoundError, match="cannot read"):
    search.search_lines(served, str(tmp_path / "absent.png"), 3)
  with pytest.raises(ValueError, match=r"query images: expected shape \[b, 32, 32, 3\]"):
    served.embed_query(np.zeros((2, 16, 16, 3), np.uint8))
  with pytest.raises(TypeError, match="expected dtype uint8"):
    served.embed_query(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(FileExistsError, match="already exists"):
    export.export_run(workdir, out)
  with pytest.raises(ValueError, match=r"eval splits of .* are \['eval_cluttered', "
                                       r"'eval_normal'\]"):
    export.export_run(workdir, str(tmp_path / "new"), split="eval_nothing")
  with pytest.raises(ValueError, match="already in the catalog"):
    search.add_items(served, os.path.join(run[1], SPLIT))
  assert served.embed_query(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 256)


def test_export_cli_reports_a_bad_split(run, tmp_path):
  result = _subprocess(["-m", "tigerfg_jax.serving.export", f"--workdir={run[0]}",
                        f"--out={tmp_path / 'new'}", "--split=eval_nothing"])
  assert result.returncode == 2
  assert "export: error: --split='eval_nothing': no folder" in result.stderr
  assert not os.path.exists(tmp_path / "new")


def test_search_cli_prints_k_hits(run, served):
  _, root, out = run
  records = _split_records(root)
  image = os.path.join(records.directory, records.queries[3].image)
  result = _subprocess(["-m", "tigerfg_jax.serving.search", f"--export={out}", f"--image={image}",
                        "--k=5"])
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 5
  parsed = [HIT_LINE.match(line).groups() for line in lines]
  ids, scores = served.search(served.load_images([image], "query"), 5)
  title_of = dict(zip(served.item_ids, served.titles))
  for rank, (got_rank, item_id, score, title) in enumerate(parsed, start=1):
    assert int(got_rank) == rank
    assert item_id == ids[0, rank - 1]
    assert title == title_of[item_id]
    np.testing.assert_allclose(float(score), scores[0, rank - 1], atol=1e-6)


def test_loader_needs_no_model_code(run):
  _, root, out = run
  image = os.path.join(_split_records(root).directory, "queries", "00000.jpg")
  code = (
      "import sys\n"
      "from tigerfg_jax.serving import artifact\n"
      f"model = artifact.load({out!r})\n"
      f"ids, _ = model.search(model.load_images([{image!r}], 'query'), 3)\n"
      "assert ids.shape == (1, 3), ids.shape\n"
      "loaded = [m for m in sys.modules if m == 'flax' or m.startswith(('flax.', "
      "'tigerfg_jax.models', 'tigerfg_jax.training', 'tigerfg_jax.sharding', 'optax'))]\n"
      "print('LOADED', loaded)\n")
  result = _subprocess(["-c", code])
  assert result.returncode == 0, result.stderr
  assert "LOADED []" in result.stdout


def _copied_split(root, out_dir, rows, prefix):
  """A split folder holding items `rows` of the catalog split under new ids."""
  source = _split_records(root)
  os.makedirs(os.path.join(out_dir, "items"))
  os.makedirs(os.path.join(out_dir, "queries"))
  items, queries = [], []
  for row in rows:
    item = source.items[row]
    shutil.copy(os.path.join(source.directory, item.image), os.path.join(out_dir, item.image))
    query = source.queries[row]
    shutil.copy(os.path.join(source.directory, query.image),
                os.path.join(out_dir, query.image))
    items.append({"item_id": prefix + item.item_id, "image": item.image,
                  "title": item.title})
    queries.append({"query_id": prefix + query.query_id, "image": query.image,
                    "item_ids": [prefix + item.item_id], "box": None})
  for name, lines in (("items.jsonl", items), ("queries.jsonl", queries)):
    with open(os.path.join(out_dir, name), "w") as f:
      f.writelines(json.dumps(line) + "\n" for line in lines)
  return [prefix + source.items[row].item_id for row in rows]


def test_items_cli_adds_searchable_items(run, served, tmp_path):
  _, root, out = run
  copy = str(tmp_path / "export")
  shutil.copytree(out, copy)
  records = _split_records(root)
  query = os.path.join(records.directory, records.queries[5].image)
  top_ids, top_scores = served.search(served.load_images([query], "query"), 1)
  top_row = served.item_ids.index(top_ids[0, 0])
  # Copies of the query's best item and of two others, under new ids.
  rows = [top_row, (top_row + 1) % 24, (top_row + 2) % 24]
  added = _copied_split(root, str(tmp_path / "new_items"), rows, "added-")

  result = _subprocess(["-m", "tigerfg_jax.serving.search", f"--export={copy}",
                        f"--items={tmp_path / 'new_items'}", f"--image={query}", "--k=2"])
  assert result.returncode == 0, result.stderr
  hits = [HIT_LINE.match(line).groups() for line in result.stdout.strip().splitlines()]
  # The copy of the best item scores as its original: the two share ranks 1 and 2.
  assert {h[1] for h in hits} == {top_ids[0, 0], added[0]}
  np.testing.assert_allclose([float(h[2]) for h in hits], [top_scores[0, 0]] * 2, atol=1e-5)

  updated = artifact.load(copy)  # the rewritten manifest verifies
  assert updated.item_ids == served.item_ids + added
  assert updated.titles[-3:] == [served.titles[r] for r in rows]
  # Added rows are embedded by the exported item encoder like the originals.
  np.testing.assert_allclose(updated.index.embeddings[-3:], served.index.embeddings[rows],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=f"'{added[0]}' is already in the catalog"):
    search.add_items(updated, str(tmp_path / "new_items"))
