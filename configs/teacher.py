r"""Stage 1: the privileged teacher.

Its item embedding is pooled from the ground-truth target region (the box mask on the
patch grid restricts the text-guided pooling), the explicit-localisation pipeline the
student later matches without boxes. Trained with InfoNCE on original + Mosaic items.

  python -m tigerfg_jax.main --config=configs/teacher.py[:tiny|b16] --workdir=DIR
"""

from tigerfg_jax import config_lib


def get_config(arg=None):
  return config_lib.experiment_config("teacher", arg)
