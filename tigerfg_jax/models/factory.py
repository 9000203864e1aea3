"""Building a `TigerFG` from an experiment config, and the inputs that trace it.

One place for both, so every caller (trainer, workdir loading, export, parameter
summary, ahead-of-time compilation) builds the same model from the same inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from tigerfg_jax.models import towers


def build_model(config: ml_collections.ConfigDict, vocab_size: int) -> towers.TigerFG:
  """The `TigerFG` of `config.model` with the tokenizer's `vocab_size` filled in."""
  model_config = config.model.copy_and_resolve_references()
  model_config.vocab_size = vocab_size
  return towers.TigerFG(ml_collections.FrozenConfigDict(model_config))


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, Any]:
  """A zero training batch in the batch contract (docs/ARCHITECTURE.md "Batches").

  Used to trace `model.init` / `jax.eval_shape`; every array has its real dtype and
  the shape the config gives, with a batch of `batch_size`; `text_tokens` /
  `text_mask` when the model has a text query tower.
  """
  item, query = config.data.item_image_size, config.data.query_image_size
  num_patches = (item // config.model.patch_size) ** 2
  length = config.model.max_title_len
  text = {}
  if config.model.text_query_encoder != "none":
    text = {"text_tokens": jnp.zeros((batch_size, config.model.max_query_len), jnp.int32),
            "text_mask": jnp.ones((batch_size, config.model.max_query_len), bool)}
  return {
      **text,
      "query_image": jnp.zeros((batch_size, query, query, 3), jnp.uint8),
      "item_image": jnp.zeros((batch_size, item, item, 3), jnp.uint8),
      "title_tokens": jnp.zeros((batch_size, length), jnp.int32),
      "title_mask": jnp.ones((batch_size, length), bool),
      "box": jnp.zeros((batch_size, 4), jnp.float32),
      "has_box": jnp.zeros((batch_size,), bool),
      "spatial_target": jnp.full((batch_size, num_patches), 1 / num_patches, jnp.float32),
      "group": jnp.arange(batch_size, dtype=jnp.int32),
  }


def abstract_variables(model: towers.TigerFG, config: ml_collections.ConfigDict) -> Any:
  """`model.init`'s variables as `jax.ShapeDtypeStruct`s (boxed with logical axes).

  Nothing is allocated, so this works for any model size on any machine.
  """
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_batch(config, 2)))
