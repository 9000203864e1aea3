"""Memory and FLOPs of the real train update under each `model.remat` policy: one table.

  python benchmarks/remat_memory.py [--preset=b16 --stage=teacher --batch=8
                                     --policies=none,full,dots,names]

Compiles (ahead of time, nothing runs) the jitted update of `training.trainer.make_trainer` (the
towers' forward pass, the stage's loss, its gradients and the optimizer step) at
`--batch` examples on this machine's default device, for each policy, and prints from
XLA's analyses:
  temp MiB     `memory_analysis().temp_size_in_bytes`: activations and scratch, the part
               the policy changes (parameters and optimizer state are the arguments).
  args MiB     `argument_size_in_bytes` (train state + batch), the same for every policy.
  GFLOP        `cost_analysis()['flops']` of one update (recomputation included).
  vs none      the FLOPs over the 'none' policy's: the price of the saved memory.
  compile s    wall time of lower + compile.
The temp column grows about linearly with the batch, so `temp / batch` says how many
examples fit beside the state in a chip's memory. XLA:CPU's schedule does not keep the
saving (b16, batch 8 and 32: the same ~490 MiB per example under every policy); read
the memory columns from an ahead-of-time compile for the target chip.
"""

from __future__ import annotations

import time

import jax
from absl import app, flags

from tigerfg_jax import config_lib, sharding
from tigerfg_jax.models import factory, transformer
from tigerfg_jax.training import trainer as trainer_lib

_PRESET = flags.DEFINE_enum("preset", "b16", config_lib.PRESETS, "Config preset.")
_STAGE = flags.DEFINE_enum("stage", "teacher", ["teacher", "clip_style"],
                           "Stage (a stage without a teacher model to load).")
_BATCH = flags.DEFINE_integer("batch", 8, "Global batch size.")
_POLICIES = flags.DEFINE_list("policies", list(transformer.REMAT_POLICIES),
                              "model.remat policies to compile.")
_VOCAB = 512
_MIB = 2**20


def compile_update(preset: str, stage: str, batch: int, remat: str):
  """The compiled update of `stage` at `preset` with `model.remat=remat`."""
  config = config_lib.experiment_config(stage, preset)
  config.model.remat = remat
  config.train.batch_size = batch
  mesh = sharding.make_mesh(config.mesh)
  trainer = trainer_lib.make_trainer(config, mesh, _VOCAB)
  abstract_batch = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=trainer.batch_sharding),
      jax.eval_shape(lambda: factory.dummy_batch(config, batch)))
  return trainer.update.lower(trainer.abstract_state, None, abstract_batch).compile()


def main(argv):
  del argv
  config = config_lib.experiment_config(_STAGE.value, _PRESET.value)
  print(f"preset={_PRESET.value} stage={_STAGE.value} batch={_BATCH.value} "
        f"dtype={config.model.dtype} attention={config.model.attention} "
        f"device={jax.devices()[0].platform}")
  print(f"{'remat':<8}{'temp MiB':>10}{'args MiB':>10}{'GFLOP':>10}{'vs none':>9}"
        f"{'compile s':>11}")
  base_flops = None
  for policy in _POLICIES.value:
    start = time.perf_counter()
    compiled = compile_update(_PRESET.value, _STAGE.value, _BATCH.value, policy)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    base_flops = base_flops or (flops if policy == "none" else None)
    ratio = f"{flops / base_flops:.3f}" if base_flops else "-"
    print(f"{policy:<8}{memory.temp_size_in_bytes / _MIB:>10.1f}"
          f"{memory.argument_size_in_bytes / _MIB:>10.1f}{flops / 1e9:>10.1f}"
          f"{ratio:>9}{seconds:>11.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
