"""A run folder is written only after config, data and checkpoint are checked; a
resume may change a run's length and cadence, never what the run is."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests import train_helpers
from tigerfg_jax import config_lib
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import DatasetError
from tigerfg_jax.serving import export
from tigerfg_jax.training import trainer


@pytest.fixture(name="finished_run")
def finished_run_fixture(micro_run):
  """(catalog dir, workdir) of the shared 2-step micro run."""
  return micro_run[1], micro_run[0]


def _copy(run: str, tmp_path) -> str:
  copy = str(tmp_path / "run")
  shutil.copytree(run, copy)
  return copy


def test_a_refused_resume_leaves_the_run_as_it_was(finished_run, tmp_path):
  _, run = finished_run
  workdir = _copy(run, tmp_path)
  config = workdir_lib.load_config(workdir)
  before = open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "rb").read()
  changed = config_lib.apply_overrides(config.copy_and_resolve_references(), {
      "model.pooling_mlp_dim": 32, "seed": 7, "train.learning_rate": 0.5})
  with pytest.raises(workdir_lib.ResumeRefusedError) as refused:
    trainer.train_and_evaluate(changed, workdir)
  message = str(refused.value)
  assert "config.model.pooling_mlp_dim: the run has 64, this command 32" in message
  assert "config.seed: the run has 0, this command 7" in message
  assert "config.train.learning_rate: the run has 0.001, this command 0.5" in message
  assert open(os.path.join(workdir, workdir_lib.CONFIG_FILE), "rb").read() == before
  manifest = export.export_run(workdir, str(tmp_path / "export"), platforms=("cpu",))
  assert manifest["source"]["checkpoint_step"] == 2


def test_a_resume_may_change_length_and_cadence_and_records_it(finished_run, tmp_path):
  _, run = finished_run
  workdir = _copy(run, tmp_path)
  config = config_lib.apply_overrides(workdir_lib.load_config(workdir), {
      "train.steps": 3, "train.log_every": 3})
  trainer.train_and_evaluate(config, workdir)
  assert workdir_lib.checkpoint_manager(workdir).latest_step() == 3
  assert workdir_lib.load_config(workdir).train.steps == 3
  with open(os.path.join(workdir, workdir_lib.CONFIG_CHANGES_FILE)) as f:
    records = [json.loads(line) for line in f]
  assert {(r["key"], r["old"], r["new"], r["step"]) for r in records} == {
      ("train.steps", 2, 3, 2), ("train.log_every", 1, 3, 2)}


def test_a_data_failure_writes_nothing(tmp_path):
  root = tmp_path / "data"
  for split in ("train", "eval_normal"):
    (root / split).mkdir(parents=True)
    (root / split / "items.jsonl").write_text("")
    (root / split / "queries.jsonl").write_text("")
  workdir = tmp_path / "run"
  config = train_helpers.micro_config(**{"data.root": str(root), **train_helpers.NO_TEACHER})
  with pytest.raises(DatasetError):
    trainer.train_and_evaluate(config, str(workdir))
  assert not workdir.exists() or not os.listdir(workdir)


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a folder")
  with pytest.raises(NotADirectoryError, match="is a file, not a run folder"):
    trainer.train_and_evaluate(train_helpers.micro_config(), str(path))
