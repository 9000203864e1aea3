r"""Speed of the real train update: one row per precision / attention / remat setting.

  python -m benchmarks.train_step --config=configs/distill.py:b16 [--batch=N]
      [--steps=10 --warmup=2] [--rows=float32,bfloat16]

Builds the stage's jitted update (`training.trainer.make_trainer`: the towers, the
stage's losses, gradients, AdamW; for `distill` the frozen teacher's forward too, its
params a random init of the same model), puts one batch on the devices, compiles,
warms up, then times `--steps` updates with the data already on device (no input
pipeline; `benchmarks/input_pipeline.py` measures that). Rows, each adding one change
to the row above (the last rows vary `model.remat`); `--rows` picks some by key:

  float32              model.dtype=float32, model.attention=einsum, model.remat=none
  bfloat16             + bfloat16 compute (float32 params, optimizer state, losses)
  dot_product          + jax.nn.dot_product_attention in the encoders
  remat_<policy>       + each of model.remat 'full', 'dots', 'names'

Each row compiles its own update (about 160 s for distill at B/16 on one H200), so
on a lent accelerator with little time run a few rows per call.

Columns: ms/step (median), examples/s, TFLOP/s per device (analytic matmul FLOPs of
`training.flops`, the count MFU uses), MFU (against the device's bf16 peak; '-' where
unknown, e.g. CPU), the compiled step's memory per device (arguments + outputs +
temporaries - aliased, `memory_analysis()`), and the speed ratio to the first row run. On
a CPU only the ratios mean something (and XLA:CPU keeps no remat saving); on a GPU/TPU
run it at the preset's scale.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from tigerfg_jax import config_lib, sharding
from tigerfg_jax.models import factory
from tigerfg_jax.training import flops, trainer as trainer_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/distill.py:tiny",
                                          "Experiment config (stage and preset).")
_BATCH = flags.DEFINE_integer("batch", None, "Global batch (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed updates per row.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed updates after compiling.")
_ROWS = flags.DEFINE_list("rows", None, "Keys of the rows to run, in table order (default: "
                          "all); the first is the speed ratio's baseline.")
_VOCAB = 512
_GIB = 2**30

# key -> (label in the table, overrides).
ROWS = {
    "float32": ("float32", {"model.dtype": "float32", "model.attention": "einsum",
                            "model.remat": "none"}),
    "bfloat16": ("bfloat16", {"model.dtype": "bfloat16", "model.attention": "einsum",
                              "model.remat": "none"}),
    "dot_product": ("+ dot_product_attn", {"model.dtype": "bfloat16",
                                           "model.attention": "dot_product",
                                           "model.remat": "none"}),
    **{f"remat_{policy}": (f"+ remat={policy}", {"model.dtype": "bfloat16",
                                                 "model.attention": "dot_product",
                                                 "model.remat": policy})
       for policy in ("full", "dots", "names")},
}


def select_rows(keys: list[str] | None) -> list[str]:
  """The `--rows` keys in table order (all of them for None); unknown keys are an error."""
  if keys is None:
    return list(ROWS)
  unknown = [k for k in keys if k not in ROWS]
  if not keys:
    raise ValueError(f"--rows is empty; expected some of {', '.join(ROWS)}")
  if unknown:
    raise ValueError(f"--rows={','.join(keys)}: unknown {unknown}; expected some of "
                     f"{', '.join(ROWS)}")
  return [k for k in ROWS if k in keys]


def _host_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, np.ndarray]:
  """A well-formed random batch (the batch contract of docs/ARCHITECTURE.md)."""
  rng = np.random.default_rng(0)
  batch = {k: np.asarray(v) for k, v in factory.dummy_batch(config, batch_size).items()}
  for key in ("query_image", "item_image"):
    batch[key] = rng.integers(0, 256, batch[key].shape, np.uint8)
  batch["title_tokens"] = rng.integers(4, _VOCAB, batch["title_tokens"].shape, np.int32)
  if trainer_lib.needs_target_crops(config):
    batch["target_image"] = rng.integers(0, 256, batch["item_image"].shape, np.uint8)
  return batch


def measure(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Times `config`'s update; returns the row's numbers."""
  mesh = sharding.make_mesh(config.mesh)
  teacher_model, frozen, teacher_config = None, None, None
  if trainer_lib.needs_teacher(config):
    plain = trainer_lib.make_trainer(config, mesh, _VOCAB)
    teacher_model = plain.model
    frozen = {"teacher": plain.init(jax.random.PRNGKey(1)).params}
    teacher_config = config
  built = trainer_lib.make_trainer(config, mesh, _VOCAB, teacher_model, frozen)
  state = built.init(jax.random.PRNGKey(0))
  batch = sharding.global_batch(_host_batch(config, config.train.batch_size),
                                built.batch_sharding)
  start = time.perf_counter()
  compiled = built.update.lower(state, frozen, batch).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  for _ in range(_WARMUP.value):
    state, measurements = compiled(state, frozen, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    state, measurements = compiled(state, frozen, batch)
    jax.block_until_ready(measurements)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  step_flops = flops.train_step_flops(config, teacher_config)
  devices = jax.device_count()
  return dict(
      ms=1e3 * step_s, examples_per_s=config.train.batch_size / step_s,
      tflops=step_flops / step_s / devices / 1e12,
      mfu=flops.mfu(step_flops, step_s, jax.devices()[0].device_kind, devices),
      gib=(memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes) / _GIB,
      compile_s=compile_s)


def main(argv: list[str]) -> None:
  del argv
  keys = select_rows(_ROWS.value)
  base = _CONFIG.value
  if _BATCH.value:
    base.train.batch_size = _BATCH.value
  print(f"{base.stage} at {base.preset}, global batch {base.train.batch_size}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, {_STEPS.value} timed steps",
        flush=True)
  header = ("| row | ms/step | examples/s | TFLOP/s/device | MFU | GiB/device | compile s "
            f"| speed vs {ROWS[keys[0]][0]} |")
  print(header + "\n" + "|---" * 8 + "|", flush=True)
  baseline = None
  for key in keys:
    name, overrides = ROWS[key]
    config = config_lib.apply_overrides(base.copy_and_resolve_references(), overrides)
    row = measure(config)
    baseline = baseline or row["ms"]
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    print(f"| {name} | {row['ms']:.1f} | {row['examples_per_s']:.1f} | {row['tflops']:.3f} "
          f"| {mfu} | {row['gib']:.2f} | {row['compile_s']:.0f} | "
          f"{baseline / row['ms']:.2f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
