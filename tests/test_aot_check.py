"""`python -m tigerfg_jax.aot_check` compiles the micro config for a TPU slice on CPU.

Needs libtpu (requirements-test.txt); without it the module is skipped. Each compile
takes about a minute of CPU, so the two runs the tests compare go in parallel.
"""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="aot_check compiles for TPUs: pip install libtpu "
                    "(requirements-test.txt)")

from tigerfg_jax import config_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from tigerfg_jax.training import flops  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGY = "v5e:2x2"
LAST_LINE = re.compile(r"peak_bytes_per_chip=(\d+) flops_per_step=(\d+) topology=(\S+)")


def start(*args, config="configs/distill.py:micro"):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # libtpu loads.
  return subprocess.Popen(
      [sys.executable, "-m", "tigerfg_jax.aot_check", f"--config={config}", *args],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
  stdout, stderr = process.communicate(timeout=900)
  return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def runs():
  """{name: (returncode, stdout, stderr)}: the micro distill config at its batch of 8
  (both stages), and the micro teacher at global batches 512 and 1024 (up to ~256 its
  memory is the compiler's fixed scratch, ~30 MB per chip whatever the batch; at 1024
  activations dominate). The teacher compiles in a third of the distill step's time."""
  processes = {
      "distill": start(f"--topology={TOPOLOGY}"),
      512: start(f"--topology={TOPOLOGY}", "--config.train.batch_size=512",
                 config="configs/teacher.py:micro"),
      1024: start(f"--topology={TOPOLOGY}", "--config.train.batch_size=1024",
                  config="configs/teacher.py:micro")}
  return {name: finish(process) for name, process in processes.items()}


def last_line(run):
  returncode, stdout, stderr = run
  assert returncode == 0, stderr[-3000:]
  match = LAST_LINE.fullmatch(stdout.strip().splitlines()[-1])
  assert match, stdout
  return int(match.group(1)), int(match.group(2)), match.group(3)


def test_last_line_reports_memory_and_flops(runs):
  peak, step_flops, topology = last_line(runs["distill"])
  assert topology == TOPOLOGY
  assert peak > 0
  # The whole step does at least the matmuls of the analytic count (XLA also counts
  # elementwise work): the distill step, the larger of the two compiled.
  config = config_lib.experiment_config("distill", "micro")
  assert step_flops >= flops.train_step_flops(config, config)


def test_both_stages_of_distill_are_compiled(runs):
  stdout = runs["distill"][1]
  assert re.search(r"^stage=teacher: .* fits=yes", stdout, re.M), stdout
  assert re.search(r"^stage=distill: .* fits=yes", stdout, re.M), stdout


def test_doubling_the_batch_needs_more_memory_and_flops(runs):
  peak_small, flops_small, _ = last_line(runs[512])
  peak_large, flops_large, _ = last_line(runs[1024])
  assert peak_large > 1.5 * peak_small
  assert flops_large > 1.5 * flops_small


@pytest.mark.parametrize("args, message", [
    (["--topology=v9:2x2"], "--topology='v9:2x2': not a TPU topology"),
    ([f"--topology={TOPOLOGY}", "--config.train.bogus=1"],
     "--config.train.bogus: the config has no key 'bogus'"),
    ([f"--topology={TOPOLOGY}", "--config.train.batch_size=6"],
     "batch_size=6 is not divisible by the 'data' mesh axis (4 of 4 devices)"),
])
def test_user_errors_are_one_line_without_traceback(args, message):
  returncode, stdout, stderr = finish(start(*args))
  assert returncode == 2
  ours = [line for line in stderr.splitlines()
          if line.startswith("tigerfg_jax.aot_check: error: ")]
  assert len(ours) == 1 and message in ours[0], stderr[-3000:]
  assert "Traceback" not in stderr
  assert not stdout


def test_an_over_hbm_compile_error_gives_a_lower_bound_on_the_bytes():
  """The messages the TPU compiler gave: the micro teacher at batch 4194304 on v5e
  (temporaries alone), and the zoomed b16 distill step at batch 1024 on v5e:2x4 (all it
  had placed when it ran out)."""
  from tigerfg_jax import aot_check  # pylint: disable=g-import-not-at-top (libtpu first)
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (112.40T) exceeds available HBM (15.75G).")
  assert aot_check.over_hbm_bytes(message) == int(112.40 * 2**40)
  message = ("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent "
             "error. Ran out of memory in memory space hbm. Used 15.85G of 15.75G hbm. "
             "Exceeded hbm capacity by 109.75M.")
  assert aot_check.over_hbm_bytes(message) == int(15.85 * 2**30)
  assert aot_check.over_hbm_bytes("RESOURCE_EXHAUSTED: something else") is None
