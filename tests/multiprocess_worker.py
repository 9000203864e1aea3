"""One process of a 2-process CPU job (jax.distributed over a 127.0.0.1 coordinator).

  python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process feeds its own half of every global batch; both save the params they hold.
With NUM_PROCESSES=1 it is the single-process reference run.
"""

import os
import sys

process_id, num_processes, port, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                        sys.argv[4])
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tests import train_helpers  # noqa: E402
from tigerfg_jax import sharding  # noqa: E402
from tigerfg_jax.training import trainer  # noqa: E402

STEPS = 3
BATCH = 8


def main():
  if num_processes > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=num_processes, process_id=process_id)
  assert jax.process_count() == num_processes
  # One look at each item: the zoom's crops are per-row and change nothing about how
  # the processes split a batch, and each extra look adds to three compilations.
  config = train_helpers.micro_config(**{"train.batch_size": BATCH,
                                         **train_helpers.ONE_LOOK,
                                         **train_helpers.NO_TEACHER})
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.make_trainer(config, mesh, train_helpers.VOCAB_SIZE)
  state = built.init(jax.random.PRNGKey(0))
  local = BATCH // num_processes
  losses = []
  for step in range(STEPS):
    full = train_helpers.random_batch(config, BATCH, step)
    mine = {k: v[process_id * local:(process_id + 1) * local] for k, v in full.items()}
    state, measurements = built.update(
        state, None, sharding.global_batch(mine, built.batch_sharding))
    losses.append(float(measurements["loss"]))
  params = {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
            for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  np.savez(out, losses=np.array(losses), **params)
  if num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
