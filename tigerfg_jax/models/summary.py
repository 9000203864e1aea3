r"""Parameter table of `TigerFG` per tower, from shapes only (`jax.eval_shape`).

  python -m tigerfg_jax.models.summary --config=configs/distill.py[:micro|tiny|b16]

Nothing is allocated, so it runs for any size on any machine. `model.vocab_size` 0
(the tokenizer is not trained yet) is replaced by `data.vocab_size`. The last line is
`query_tower_params=N`: the ViT plus the query projection (plus the MAP head when
`query_pool='map'`), i.e. everything a deployed query encoder holds.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from tigerfg_jax import cli
from tigerfg_jax.models import factory


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """`TigerFG` parameter tree of `jax.ShapeDtypeStruct`s for the full `config`."""
  vocab_size = config.model.vocab_size if config.model.vocab_size > 0 else config.data.vocab_size
  model = factory.build_model(config, vocab_size)
  return nn.meta.unbox(factory.abstract_variables(model, config))["params"]


def _count(tree: Any) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def parameter_counts(params: Any) -> dict[str, int]:
  """Parameter counts by part, and per tower, of a `TigerFG` parameter tree.

  Keys: 'vision', 'query_head', 'item_vision' (0 when shared), 'text_encoder',
  'pooling', 'item_head', 'temperature', and the totals 'query_tower',
  'item_tower' (its ViT, shared or not, included) and 'total'.
  """
  item = dict(params["item_tower"])
  counts = dict(
      vision=_count(params["vision"]),
      query_head=_count(params["query_tower"]),
      item_vision=_count(params.get("item_vision", {})),
      text_encoder=_count(item.pop("text_encoder")),
      pooling=_count(item.pop("pooling")),
      item_head=_count(item),
      temperature=_count(params["log_temperature"]),
  )
  counts["query_tower"] = counts["vision"] + counts["query_head"]
  counts["item_tower"] = (counts["item_vision"] or counts["vision"]) + sum(
      counts[k] for k in ("text_encoder", "pooling", "item_head"))
  counts["total"] = _count(params)
  return counts


def format_table(counts: dict[str, int], config: ml_collections.ConfigDict) -> str:
  """The printed table; its last line is `query_tower_params=N`."""
  shared = config.model.share_vision
  rows = [
      ("vision (ViT %s%s)" % (config.model.vision_variant,
                              ", shared by both towers" if shared else ", query"),
       counts["vision"]),
      (f"query head (projection{', MAP' if config.model.query_pool == 'map' else ''})",
       counts["query_head"]),
  ]
  if not shared:
    rows.append(("item vision (own ViT)", counts["item_vision"]))
  pooling = ("TextGuidedPooling" if config.model.mode == "tiger"
             else "global MAP pooling")
  rows += [
      (f"text encoder ({config.model.text_variant})", counts["text_encoder"]),
      (f"pooling ({pooling})", counts["pooling"]),
      ("item head (merge, projection)", counts["item_head"]),
      ("temperature", counts["temperature"]),
      ("query tower", counts["query_tower"]),
      ("item tower", counts["item_tower"]),
      ("total (shared weights once)", counts["total"]),
  ]
  width = max(len(name) for name, _ in rows)
  lines = [f"{'part':<{width}}  {'params':>13}"]
  lines += [f"{name:<{width}}  {count:>13,d}" for name, count in rows]
  lines.append(f"query_tower_params={counts['query_tower']}")
  return "\n".join(lines)


def define_flags() -> None:
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (configs/NAME.py[:preset]).")
  flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  config = flags.FLAGS.config
  print(format_table(parameter_counts(abstract_params(config)), config))


def run() -> None:
  cli.run(main, define_flags, "tigerfg_jax.models.summary")


if __name__ == "__main__":
  run()
