"""A two-process jax.distributed CPU job trains in lockstep and matches one process."""

import os
import socket
import subprocess
import sys

import numpy as np

from tests import train_helpers

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")



def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_hold_identical_params(tmp_path):
  port = str(_free_port())
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  outs = [tmp_path / f"p{i}.npz" for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), "2", port, str(out)], env=env)
           for i, out in enumerate(outs)]
  assert [p.wait(timeout=600) for p in procs] == [0, 0]
  single = tmp_path / "single.npz"
  subprocess.run([sys.executable, WORKER, "0", "1", port, str(single)], env=env,
                 check=True, timeout=600)
  a, b, ref = (dict(np.load(path)) for path in (*outs, single))
  assert set(a) == set(b) == set(ref)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_allclose(a[key], ref[key], rtol=1e-4, atol=train_helpers.ADAM_ATOL,
                               err_msg=key)
