r"""Text-query retrieval over the multimodal catalog (SMAR / Beyond Text's setting).

A typed query ("red mug with blue stripes", `text_queries.jsonl`) against items of image
+ title. `model.item_fusion` picks the item side: 'text' (title only: the text-only
two-tower baseline), 'image', 'concat', 'beyond_text' (attention modality fusion), 'smar'
(text / image / multimodal item embeddings, multi-task alignment, per-query gate) or
'tiger' (the TIGER-FG item tower, so one index serves image and text queries). Its
default is the best multimodal fusion measured (docs/results_text_queries.md).

  python -m tigerfg_jax.main --config=configs/text_query.py[:tiny|b16] --workdir=DIR \
      [--config.model.item_fusion=smar]
"""

from tigerfg_jax import config_lib


def get_config(arg=None):
  return config_lib.experiment_config("text_query", arg)
