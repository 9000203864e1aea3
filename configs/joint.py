r"""One model for both query kinds: the distill stage plus text queries.

The full TIGER-FG objective for image queries (configs/distill.py) and the text-query
InfoNCE `t2i` on the same TIGER-FG item embeddings, through a text query tower of its
own: one item index answers a product photo and a typed query. The synthetic catalog
gets the `eval_text` split (docs/DATA.md) for the typed queries.

  python -m tigerfg_jax.main --config=configs/joint.py[:tiny|b16] --workdir=DIR
"""

from tigerfg_jax import config_lib


def get_config(arg=None):
  config = config_lib.experiment_config("distill", arg)
  config.loss.w_t2i = 1.0
  config.model.text_query_encoder = "own"
  preset = config_lib.PRESETS[config.preset]
  config.data.synthetic_text_eval_items = preset.synthetic_text_eval_items
  return config
