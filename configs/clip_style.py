r"""Baseline: the paper's CLIP-style item encoder.

The item embedding is a global pooling of the whole item image fused with the title
embedding; the title does not guide the pooling. InfoNCE only, no Mosaic, and as many
optimisation steps as the distill stage's teacher and student together (equal compute).

  python -m tigerfg_jax.main --config=configs/clip_style.py[:tiny|b16] --workdir=DIR
"""

from tigerfg_jax import config_lib


def get_config(arg=None):
  return config_lib.experiment_config("clip_style", arg)
