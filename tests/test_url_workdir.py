"""gs:// run folders (`tigerfg_jax.runpath`): the access check and the files written there.

No network here: a gs:// folder this machine cannot use must fail in one line before any
work; the run files themselves are checked on a fake gs:// backend (an fsspec file
system that keeps each bucket in a temporary folder). Not covered: Orbax's checkpoint
arrays on gs://, which TensorStore writes with its own GCS driver (not through fsspec).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

from tests import train_helpers
from tigerfg_jax import runpath
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data.tokenizer import build_tokenizer
from tigerfg_jax.serving import artifact
from tigerfg_jax.serving import export
from tigerfg_jax.training import metric_writer
from tigerfg_jax.training import trainer

# The module: `fsspec.registry` names its read-only view of the same dict.
_FSSPEC_REGISTRY = sys.modules["fsspec.registry"]._registry
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clear_epath_cache():
  type(epath_backend.fsspec_backend)._get_filesystem.cache_clear()


@pytest.fixture
def no_gcs_backend(monkeypatch):
  """gs:// as on a machine without gcsfs."""
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  for name in ("gs", "gcs"):
    monkeypatch.delitem(_FSSPEC_REGISTRY, name, raising=False)
  _clear_epath_cache()
  yield
  _clear_epath_cache()


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://BUCKET/PATH served from tmp_path/buckets/BUCKET/PATH; returns that root."""
  root = tmp_path / "buckets"
  root.mkdir()

  class FakeGcs(LocalFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, **kwargs):
      del kwargs  # gcsfs options such as finalize_on_close.
      super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
      path = os.fspath(path)
      if path.startswith("gs://"):
        path = os.path.join(root, path[len("gs://"):])
      return super()._strip_protocol(path)

  for name in ("gs", "gcs"):
    monkeypatch.setitem(_FSSPEC_REGISTRY, name, FakeGcs)
  _clear_epath_cache()
  yield root
  _clear_epath_cache()


# ----------------------------------------------------------- no access: one line ---

def test_a_gs_workdir_without_a_backend_is_one_line_before_any_work(
    micro_catalog, no_gcs_backend, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = train_helpers.micro_config(**{"data.root": micro_catalog})
  with pytest.raises(runpath.RunFolderAccessError) as raised:
    trainer.train_and_evaluate(config, "gs://bucket/run")
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith("--workdir=gs://bucket/run: cannot use this location")
  assert "ImportError" in message and "gcsfs" in message
  assert "gcloud auth application-default login" in message
  assert not os.listdir(tmp_path)


def test_another_url_scheme_is_refused(micro_catalog, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = train_helpers.micro_config(**{"data.root": micro_catalog})
  with pytest.raises(runpath.RunFolderAccessError, match=r"s3://bucket/run: run folders "
                     r"are local paths or gs:// URLs"):
    trainer.train_and_evaluate(config, "s3://bucket/run")
  assert not os.listdir(tmp_path)


def test_a_url_workdir_needs_a_local_data_root(no_gcs_backend, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="a URL workdir needs a local dataset folder"):
    trainer.train_and_evaluate(train_helpers.micro_config(), "gs://bucket/run")
  with pytest.raises(ValueError, match="config.data.root='gs://bucket/data': dataset "
                     "folders are local"):
    trainer.train_and_evaluate(
        train_helpers.micro_config(**{"data.root": "gs://bucket/data"}), str(tmp_path / "r"))
  assert not os.listdir(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None,
                    reason="gcsfs is installed: gs:// would reach the network")
def test_the_cli_prints_the_line_and_exits_2(micro_catalog, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "tigerfg_jax.main", "--config=configs/distill.py:micro",
       "--workdir=gs://bucket/run", f"--config.data.root={micro_catalog}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if "tigerfg-train: error:" in line]
  assert errors == [f"tigerfg-train: error: {errors[0].split('error: ', 1)[1]}"]
  assert "--workdir=gs://bucket/run: cannot use this location" in errors[0]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(REPO, "gs:"))


# --------------------------------------------------- a gs:// folder that works ---

def test_the_probe_creates_the_folder_and_leaves_no_file(fake_gcs):
  runpath.check_writable("gs://bucket/run")
  assert (fake_gcs / "bucket" / "run").is_dir()
  assert not os.listdir(fake_gcs / "bucket" / "run")


def test_run_files_round_trip_on_gs(fake_gcs, micro_catalog):
  config = train_helpers.micro_config(**{"data.root": micro_catalog})
  titles = ["red cotton shirt", "blue denim jacket", "green wool hat"] * 4
  tokenizer = build_tokenizer(config.data, titles)
  workdir = "gs://bucket/run"
  workdir_lib.write_run_files(config, workdir, tokenizer, {"train.steps": (2, 5)}, step=2)
  workdir_lib.write_run_files(config, workdir, tokenizer, {"train.steps": (5, 9)}, step=5)
  local = fake_gcs / "bucket" / "run"
  assert json.loads((local / "config.json").read_text())["preset"] == "micro"
  assert workdir_lib.load_config(workdir).to_dict() == config.to_dict()
  reloaded = workdir_lib.run_tokenizer(config, workdir, [], None)
  tokens, _ = tokenizer.encode(titles[:3], 8)
  np.testing.assert_array_equal(reloaded.encode(titles[:3], 8)[0], tokens)
  changes = [json.loads(line) for line in
             (local / workdir_lib.CONFIG_CHANGES_FILE).read_text().splitlines()]
  assert [(c["step"], c["old"], c["new"]) for c in changes] == [(2, 2, 5), (5, 5, 9)]
  assert workdir_lib.resume_changes(config, workdir) == {}  # no checkpoint yet: a new run.


def test_metrics_and_tensorboard_on_gs_append_across_writers(fake_gcs):
  workdir = "gs://bucket/run"
  first = metric_writer.MetricWriter(workdir)
  first.write(1, {"loss": 2.5})
  first.close()
  second = metric_writer.MetricWriter(workdir)  # a resumed run appends.
  second.write(2, {"loss": 1.25, "eval/R@1": 50.0})
  second.close()
  local = fake_gcs / "bucket" / "run"
  rows = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
  assert rows == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.25, "eval/R@1": 50.0}]
  # One event file per writer, named by the second it opened (two writers in the same
  # second share a name, as on a local disk).
  events = sorted((local / "tensorboard").iterdir(), key=lambda e: e.stat().st_mtime)
  assert events and all(e.name.startswith("events.out.tfevents") for e in events)
  assert b"loss" in events[-1].read_bytes() and b"eval/R_1" in events[-1].read_bytes()


def test_append_lines_on_a_url_keeps_what_was_there(fake_gcs):
  file = runpath.path("gs://bucket/run", "log.jsonl")
  file.parent.mkdir(parents=True, exist_ok=True)
  runpath.append_lines(file, ["a\n"])
  runpath.append_lines(file, ["b\n", "c\n"])
  assert (fake_gcs / "bucket" / "run" / "log.jsonl").read_text() == "a\nb\nc\n"


def test_an_export_to_gs_lands_whole_and_loads(fake_gcs, micro_run, tmp_path):
  workdir, _ = micro_run
  manifest = export.export_run(workdir, "gs://bucket/exports/one", split="eval_cluttered",
                               platforms=("cpu",))
  landed = fake_gcs / "bucket" / "exports" / "one"
  assert manifest["files"] and all((landed / name).stat().st_size == entry["size"]
                                   for name, entry in manifest["files"].items())
  assert json.loads((landed / artifact.MANIFEST).read_text()) == manifest
  assert os.listdir(landed.parent) == ["one"]  # nothing partial beside it.
  served = artifact.load(str(landed))  # every file's hash checked against the manifest.
  assert served.index.num_items == manifest["source"]["num_items"]
  with pytest.raises(FileExistsError, match="gs://bucket/exports/one already exists"):
    export.export_run(workdir, "gs://bucket/exports/one", platforms=("cpu",))
