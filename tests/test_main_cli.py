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
    (["--config.train.bogus=1"], 1, "--config.train.bogus: the config has no key 'bogus'"),
    (["--config.train.steps=abc"], 1, "--config.train.steps=abc"),
    (["--config.teacher.checkpoint=/nonexistent/teacher"], 1, "/nonexistent/teacher"),
    (["--config.model.mode=detector"], 1, "config.model.mode='detector'"),
    (["--config.train.batch_size=6"], 4, "batch_size=6 must be divisible"),
])
def test_bad_config_fails_before_any_work(tmp_path, args, devices, message):
  workdir = tmp_path / "run"
  result = run_main(workdir, *args, devices=devices)
  assert result.returncode == 2
  assert message in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "tigerfg-train: error:" in result.stderr
  assert not (workdir / "data").exists()
  assert not (workdir / "checkpoints").exists()


def test_verbose_shows_the_traceback(tmp_path):
  result = run_main(tmp_path / "run", "--config.model.mode=detector", "--verbose")
  assert result.returncode == 2
  assert "Traceback" in result.stderr


@pytest.mark.parametrize("module", [
    "tigerfg_jax.main", "tigerfg_jax.serving.export", "tigerfg_jax.serving.search",
    "tigerfg_jax.data.validate", "tigerfg_jax.convert", "tigerfg_jax.evaluation.box_oracle"])
def test_help_prints_the_flags_and_exits_0(module):
  result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--workdir" in result.stdout or "--export" in result.stdout or "--root" in \
      result.stdout or "--checkpoint" in result.stdout
