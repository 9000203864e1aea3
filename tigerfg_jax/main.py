r"""Trains and evaluates one TIGER-FG stage.

  python -m tigerfg_jax.main --config=configs/distill.py[:tiny|b16] --workdir=DIR \
      [--config.train.steps=100 ...]

Without --config.data.root the synthetic catalog is written to DIR/data and used.
Running again on the same DIR resumes from its last checkpoint. SIGTERM (preemption)
saves a checkpoint at the next step boundary and exits with status 75. Multi-process jobs
(TPU pod slices, GPU clusters) call `jax.distributed.initialize()` first: automatically
where JAX detects the cluster, or from --coordinator_address/--num_processes/--process_id.
"""

from __future__ import annotations

import sys

import jax
from absl import flags
from absl import logging
from ml_collections import config_flags

from tigerfg_jax import cli
from tigerfg_jax.training import preemption
from tigerfg_jax.training import trainer


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/distill.py[:preset].",
      lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (resumed if it exists).")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0 for a multi-process job.")
  flags.DEFINE_integer("num_processes", None, "Processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_bool("multihost", False,
                    "Call jax.distributed.initialize() with cluster auto-detection.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.no_arguments(argv)
  args = flags.FLAGS
  if args.coordinator_address or args.multihost:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  logging.info("JAX %s: process %d/%d, %d devices (%s)", jax.__version__,
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    trainer.train_and_evaluate(args.config, args.workdir)
  except preemption.Preempted as stopped:
    logging.warning("%s", stopped)
    sys.exit(preemption.EXIT_PREEMPTED)


def run() -> None:
  cli.run(main, define_flags, "tigerfg-train")


if __name__ == "__main__":
  run()
