"""`python -m tigerfg_jax.convert [--format=clip|dinov2] ...`: the converters' command
line.

--format=clip (the default): a CLIP checkpoint -> a workdir to train from
(`convert.clip`). --format=dinov2: a DINOv2 checkpoint -> a patch teacher folder for
L_SRD (`convert.dinov2`). `--format=dinov2 --help` shows that converter's flags.
"""

import sys

from absl import flags

from tigerfg_jax import cli
from tigerfg_jax.convert import clip
from tigerfg_jax.convert import dinov2

FORMATS = {"clip": clip, "dinov2": dinov2}


def chosen_format(argv: list[str]) -> str:
  """The `--format` value in `argv` ('clip' when absent; an unknown one is refused
  when the flags are parsed)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--format="):
      return arg.split("=", 1)[1]
    if arg == "--format" and i + 1 < len(argv):
      return argv[i + 1]
  return "clip"


def run() -> None:
  converter = FORMATS.get(chosen_format(sys.argv[1:]), clip)

  def define_flags() -> None:
    flags.DEFINE_enum("format", "clip", sorted(FORMATS),
                      "What the checkpoint is: clip (-> a workdir) or dinov2 (-> a patch "
                      "teacher folder for L_SRD). Each has its own flags (--format=X --help).")
    converter.define_flags()

  cli.run(converter.main, define_flags, "tigerfg_jax.convert")


if __name__ == "__main__":
  run()
