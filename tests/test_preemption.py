"""SIGTERM (preemption): a checkpoint at the next step boundary, then a resume that
continues exactly as if nothing had happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests import train_helpers
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.training import preemption
from tigerfg_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


@pytest.fixture(name="catalog")
def catalog_fixture(micro_catalog):
  return micro_catalog


def _config(catalog):
  return train_helpers.micro_config(**{
      "train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 1000,
      **train_helpers.NO_TEACHER, **train_helpers.ONE_LOOK, "data.root": catalog})


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {row["step"]: row["loss"] for row in map(json.loads, f) if "loss" in row}


def _terminate_after(workdir, rows, pid):
  """Sends SIGTERM to `pid` once metrics.jsonl holds `rows` training rows."""
  def watch():
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
      if os.path.exists(path) and len(_losses(workdir)) >= rows:
        os.kill(pid, signal.SIGTERM)
        return
      time.sleep(0.005)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def test_sigterm_checkpoints_and_the_resume_matches_an_uninterrupted_run(tmp_path, catalog):
  config = _config(catalog)
  straight = trainer.train_and_evaluate(config, str(tmp_path / "straight"))
  workdir = str(tmp_path / "preempted")
  _terminate_after(workdir, 3, os.getpid())
  with pytest.raises(preemption.Preempted) as stopped:
    trainer.train_and_evaluate(config, workdir)
  step = stopped.value.step
  assert 3 <= step < STEPS, "SIGTERM arrived after the run had finished"
  assert workdir_lib.checkpoint_manager(workdir).latest_step() == step
  assert max(_losses(workdir)) == step
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed.

  resumed = trainer.train_and_evaluate(config, workdir)
  want, got = _losses(str(tmp_path / "straight")), _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  assert resumed == straight


def test_the_cli_exits_with_the_preemption_status(tmp_path, catalog):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  process = subprocess.Popen(
      [sys.executable, "-m", "tigerfg_jax.main", "--config=configs/distill.py:micro",
       f"--workdir={workdir}", f"--config.train.steps={STEPS * 25}",
       "--config.train.log_every=1", f"--config.data.root={catalog}",
       *[f"--config.{k}={v}"
         for k, v in {**train_helpers.NO_TEACHER, **train_helpers.ONE_LOOK}.items()]],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _terminate_after(workdir, 2, process.pid)
  _, stderr = process.communicate(timeout=600)
  assert process.returncode == preemption.EXIT_PREEMPTED, stderr[-2000:]
  step = workdir_lib.checkpoint_manager(workdir).latest_step()
  assert 2 <= step < STEPS * 25
  assert f"saved the checkpoint of step {step}" in stderr
  assert "Traceback" not in stderr
