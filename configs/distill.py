r"""Stage 2: the TIGER-FG student, distilled from a frozen teacher (the full method).

Every term of the objective (docs/ARCHITECTURE.md "The objective"): q2i with title-swap
hard negatives, v2t, i2v, sdd, srd and spatial_map. The student starts from a copy of the
teacher's weights (`teacher.init_student`): the teacher's features already describe the
boxed product, and the student learns to find it from the title alone. With no
`teacher.checkpoint`, the teacher stage is trained first in WORKDIR/teacher.

  python -m tigerfg_jax.main --config=configs/distill.py[:tiny|b16] --workdir=DIR
"""

from tigerfg_jax import config_lib


def get_config(arg=None):
  return config_lib.experiment_config("distill", arg)
