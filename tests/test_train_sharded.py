"""The jitted train step gives the same result on 1 and 4 devices (replicated and FSDP)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from tests import train_helpers

WORKER = os.path.join(os.path.dirname(__file__), "sharded_step_worker.py")


def run_worker(tmp_path, devices, param_sharding, stage="distill"):
  """Runs the worker in a fresh interpreter (the device count is fixed at JAX start)."""
  out = tmp_path / f"{devices}_{param_sharding}_{stage}.npz"
  subprocess.run([sys.executable, WORKER, str(devices), param_sharding, stage, str(out)],
                 check=True, timeout=600)
  return dict(np.load(out))


@pytest.fixture(scope="module")
def one(tmp_path_factory):
  """The single-device reference run, shared by both shardings."""
  return run_worker(tmp_path_factory.mktemp("one"), 1, "replicated")


@pytest.mark.parametrize("param_sharding", ["replicated", "fsdp"])
def test_four_devices_match_one(tmp_path, one, param_sharding):
  four = run_worker(tmp_path, 4, param_sharding)
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-4)
  params = [k for k in one if k not in ("losses", "max_distinct_shards")]
  assert params and set(params) == {k for k in four if k not in ("losses", "max_distinct_shards")}
  for key in params:
    np.testing.assert_allclose(four[key], one[key], rtol=1e-4, atol=train_helpers.ADAM_ATOL,
                               err_msg=key)
  # FSDP really splits parameters over the 4 devices; replicated keeps whole copies.
  if param_sharding == "fsdp":
    assert four["max_distinct_shards"] == 4
  else:
    assert four["max_distinct_shards"] == 1
  # The steps did something: losses change between steps.
  assert not np.allclose(one["losses"][0], one["losses"][-1])
