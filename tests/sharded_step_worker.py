"""Runs a few jitted train steps on N forced CPU devices and saves loss + params.

  python tests/sharded_step_worker.py DEVICES PARAM_SHARDING STAGE OUT.npz

Run as a subprocess: the device count must be set before JAX starts.
"""

import os
import sys

devices, param_sharding, stage, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after XLA_FLAGS)
import numpy as np  # noqa: E402

from tests import train_helpers  # noqa: E402
from tigerfg_jax import sharding  # noqa: E402
from tigerfg_jax.training import trainer  # noqa: E402

STEPS = 3
BATCH = 8


def main():
  assert jax.device_count() == int(devices), jax.devices()
  config = train_helpers.micro_config(stage, **{"mesh.param_sharding": param_sharding,
                                                "train.batch_size": BATCH,
                                                **train_helpers.NO_TEACHER})
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.make_trainer(config, mesh, train_helpers.VOCAB_SIZE)
  state = built.init(jax.random.PRNGKey(0))
  losses, shard_counts = [], set()
  for step in range(STEPS):
    batch = sharding.global_batch(train_helpers.random_batch(config, BATCH, step),
                                  built.batch_sharding)
    state, measurements = built.update(state, None, batch)
    losses.append(float(measurements["loss"]))
  flat = {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  for leaf in jax.tree.leaves(state.params):
    shard_counts.add(len({str(s.index) for s in leaf.addressable_shards}))
  np.savez(out, losses=np.array(losses), max_distinct_shards=max(shard_counts), **flat)


if __name__ == "__main__":
  main()
