r"""Stage 1: the privileged teacher.

Its items are the ground-truth crops (the target box cut out of the item image and
resized to the item size), so neither its ViT nor its CLS sees the clutter: the
explicit-localisation pipeline the student later matches without boxes. Trained with
q2i (title-swap hard negatives) and v2t on original and Mosaic items, and with the
spatial map on one more look at the whole item image: that look's title-guided
attention learns to follow the box, so the student it initialises starts grounded
(the retrieval terms never read that look).

  python -m tigerfg_jax.main --config=configs/teacher.py[:tiny|b16] --workdir=DIR
"""

from tigerfg_jax import config_lib


def get_config(arg=None):
  return config_lib.experiment_config("teacher", arg)
