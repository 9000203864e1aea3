r"""Will a config fit a TPU slice? Compiles its real update step ahead of time, here.

  python -m tigerfg_jax.aot_check --config=configs/distill.py:b16 --topology=v5e:2x4 \
      [--config.train.batch_size=512 ...]

Compiles the configured stage's jitted update step (the `distill` stage: its teacher
stage's too) for the named TPU topology on this machine, with no TPU attached and
nothing allocated: the state, the frozen teacher's params and the global batch are
`jax.ShapeDtypeStruct`s sharded over a ('data', 'model') mesh of the topology's devices
(`config.mesh`). Needs libtpu (`pip install -r requirements-test.txt`). For each
stage it prints the per-device memory XLA plans (arguments + outputs + temporaries -
aliased, from `memory_analysis`), the device's HBM where known, whether it fits, and the
step's FLOPs (`cost_analysis` counts one device's share; times the device count is the
whole step; the analytic matmul count of `training.flops` is printed beside it). The
last line is `peak_bytes_per_chip=N flops_per_step=F topology=T` (N and F the largest
over the stages), for scripts.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterator

import jax
import ml_collections

from absl import flags
from ml_collections import config_flags

from tigerfg_jax import cli
from tigerfg_jax import config_lib
from tigerfg_jax import sharding
from tigerfg_jax.models import factory
from tigerfg_jax.training import flops
from tigerfg_jax.training import trainer as trainer_lib

# HBM per device in GiB, by `device_kind`.
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}
# The TPU compiler's refusal of a program over HBM: "RESOURCE_EXHAUSTED: Ran out of
# memory on HBM, the total memory required for HLO temporaries (112.40T) exceeds
# available HBM (15.75G)."
# The TPU compiler's two ways of refusing a step over HBM: the temporaries alone exceed
# it, or the whole program does ("Used 15.85G of 15.75G hbm", its lower bound).
_OUT_OF_MEMORY = (
    re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds "
               r"available HBM \([0-9.]+[KMGT]\)"),
    re.compile(r"Ran out of memory in memory space hbm\. Used ([0-9.]+)([KMGT]) of "
               r"[0-9.]+[KMGT] hbm"))
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def over_hbm_bytes(message: str) -> int | None:
  """A lower bound on the bytes per device of a step the TPU compiler refused as over
  HBM (its temporaries, or all it had placed when it ran out), else None."""
  for pattern in _OUT_OF_MEMORY:
    match = pattern.search(message)
    if match is not None:
      return int(float(match.group(1)) * _UNITS[match.group(2)])
  return None


class UsageError(ValueError):
  """A bad topology or config: reported in one line, without a traceback."""


def topology_mesh(topology: str, mesh_config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A ('data', 'model') mesh over the compile-only devices of a TPU `topology`."""
  from jax.experimental import mesh_utils, topologies  # pylint: disable=g-import-not-at-top
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
  except (RuntimeError, ValueError, NotImplementedError) as e:
    message = str(e).splitlines()[0]
    if "INVALID_ARGUMENT" in message:
      raise UsageError(f"--topology={topology!r}: not a TPU topology libtpu knows "
                       f"(e.g. v5e:2x4, v5p:2x2x1, v4:2x2x1, v6e:2x2): {message}") from e
    raise UsageError(f"--topology={topology!r}: libtpu could not describe it: "
                     f"{message}") from e
  shape = sharding.mesh_shape(mesh_config, len(devices))
  auto = jax.sharding.AxisType.Auto
  return jax.sharding.Mesh(mesh_utils.create_device_mesh(shape, devices),
                           sharding.MESH_AXES, axis_types=(auto, auto))


def abstract_batch(config: ml_collections.ConfigDict,
                   batch_sharding: jax.sharding.NamedSharding) -> dict[str, Any]:
  """The global training batch as sharded ShapeDtypeStructs."""
  shapes = jax.eval_shape(lambda: factory.dummy_batch(config, config.train.batch_size))
  if trainer_lib.needs_target_crops(config):
    shapes["target_image"] = shapes["item_image"]
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
          for k, v in shapes.items()}


def lower_stage(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                teacher_config: ml_collections.ConfigDict | None = None) -> jax.stages.Lowered:
  """The lowered update step of `config.stage` over `mesh` (any mesh: a topology's
  compile-only devices too), from abstract arguments only; for `distill`, the frozen
  teacher's model comes from `teacher_config` and its params are an argument."""
  vocab_size = config.data.vocab_size
  teacher_model, frozen = None, None
  if teacher_config is not None:
    teacher_model = factory.build_model(teacher_config, vocab_size)
    frozen = {"teacher": sharding.abstract_params(teacher_model, teacher_config, mesh)}
  trainer = trainer_lib.make_trainer(config, mesh, vocab_size, teacher_model, frozen)
  batch = abstract_batch(config, trainer.batch_sharding)
  return trainer.update.lower(trainer.abstract_state, frozen, batch)


def stage_report(compiled: Any, num_devices: int) -> dict[str, int]:
  """`{'bytes_per_device', 'argument', 'output', 'temp', 'alias', 'flops_per_device',
  'flops_per_step'}` of a compiled step (integers)."""
  memory = compiled.memory_analysis()
  parts = dict(argument=memory.argument_size_in_bytes, output=memory.output_size_in_bytes,
               temp=memory.temp_size_in_bytes, alias=memory.alias_size_in_bytes)
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  per_device = int(cost.get("flops", 0))
  return dict(parts, bytes_per_device=parts["argument"] + parts["output"] + parts["temp"]
              - parts["alias"], flops_per_device=per_device,
              flops_per_step=per_device * num_devices)


def stage_configs(config: ml_collections.ConfigDict
                  ) -> list[tuple[ml_collections.ConfigDict, ml_collections.ConfigDict | None]]:
  """(stage config, its teacher's config or None) for each step to compile."""
  if not trainer_lib.needs_teacher(config):
    return [(config, None)]
  teacher = trainer_lib.teacher_stage_config(config, config.data.root)
  return [(teacher, None), (config, teacher)]


def check(config: ml_collections.ConfigDict, topology: str) -> Iterator[str]:
  """Compiles every stage of `config` for `topology`, yielding the report's lines as
  each stage is done (a b16 stage takes minutes)."""
  try:
    config_lib.validate(config)
  except ValueError as e:
    raise UsageError("; ".join(line.strip() for line in str(e).splitlines())) from e
  mesh = topology_mesh(topology, config.mesh)
  num_devices = mesh.devices.size
  kind = mesh.devices.flat[0].device_kind
  hbm = HBM_GIB.get(kind)
  data = mesh.shape["data"]
  if config.train.batch_size % data:
    raise UsageError(f"config.train.batch_size={config.train.batch_size} is not divisible "
                     f"by the 'data' mesh axis ({data} of {num_devices} devices)")
  yield (f"topology={topology}: {num_devices} x {kind}, mesh data={data} "
         f"model={mesh.shape['model']}, global batch {config.train.batch_size}")
  peak, step_flops = 0, 0
  for stage_config, teacher_config in stage_configs(config):
    analytic = flops.train_step_flops(stage_config, teacher_config)
    try:
      r = stage_report(lower_stage(stage_config, mesh, teacher_config).compile(),
                       num_devices)
    except jax.errors.JaxRuntimeError as e:
      needed = over_hbm_bytes(str(e))
      if needed is None:
        raise
      peak = max(peak, needed)
      yield (f"stage={stage_config.stage}: over HBM, fits=no (at least "
             f"{needed / 2**30:.2f} GiB per device); analytic matmuls "
             f"{analytic / 1e12:.4g} TFLOP per step")
      continue
    gib = r["bytes_per_device"] / 2**30
    fits = "unknown" if hbm is None else ("yes" if gib <= hbm else "no")
    yield (f"stage={stage_config.stage}: {gib:.2f} GiB per device (arguments "
           f"{r['argument'] / 2**30:.2f} + outputs {r['output'] / 2**30:.2f} + temporaries "
           f"{r['temp'] / 2**30:.2f} - aliased {r['alias'] / 2**30:.2f}), HBM "
           f"{'unknown' if hbm is None else f'{hbm} GiB'}, fits={fits}; "
           f"{r['flops_per_step'] / 1e12:.4g} TFLOP per step (XLA: "
           f"{r['flops_per_device'] / 1e12:.4g} per device x {num_devices}; analytic "
           f"matmuls {analytic / 1e12:.4g})")
    peak = max(peak, r["bytes_per_device"])
    step_flops = max(step_flops, r["flops_per_step"])
  yield f"peak_bytes_per_chip={peak} flops_per_step={step_flops} topology={topology}"


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/distill.py:b16.",
      lock_config=True)
  flags.DEFINE_string("topology", None, "TPU topology name, e.g. v5e:2x4 or v5p:2x2x1.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  for line in check(flags.FLAGS.config, flags.FLAGS.topology):
    print(line, flush=True)


def run() -> None:
  # Without it a second process that loads libtpu (another check, a test) fails on
  # libtpu's lockfile; these processes only compile. Read when libtpu loads.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  cli.run(main, define_flags, "tigerfg_jax.aot_check")


if __name__ == "__main__":
  run()
