"""`python -m tigerfg_jax.main` rejects bad configs clearly, before doing any work."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, *args, devices=1):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.run(
      [sys.executable, "-m", "tigerfg_jax.main", "--config=configs/distill.py:micro",
       f"--workdir={workdir}", *args],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args, devices, message", [
    (["--config.train.bogus=1"], 1, "bogus"),
    (["--config.teacher.checkpoint=/nonexistent/teacher"], 1, "/nonexistent/teacher"),
    (["--config.model.mode=detector"], 1, "config.model.mode='detector'"),
    (["--config.train.batch_size=6"], 4, "batch_size=6 must be divisible"),
])
def test_bad_config_fails_before_any_work(tmp_path, args, devices, message):
  workdir = tmp_path / "run"
  result = run_main(workdir, *args, devices=devices)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-3000:]
  assert not (workdir / "data").exists()
  assert not (workdir / "checkpoints").exists()
