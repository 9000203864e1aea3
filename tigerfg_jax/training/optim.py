"""The optimizer: AdamW with linear warmup + cosine decay and global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
  # Warmup starts one increment above zero so that the first step already updates.
  return optax.warmup_cosine_decay_schedule(
      init_value=train_config.learning_rate / (train_config.warmup_steps + 1),
      peak_value=train_config.learning_rate,
      warmup_steps=train_config.warmup_steps,
      decay_steps=max(train_config.steps, train_config.warmup_steps + 1),
      end_value=train_config.learning_rate * 0.01)


def decay_mask(params: Any) -> Any:
  """Weight decay on the layers' weight matrices (`kernel`s of Dense, attention and
  the patch convolution) only: not on biases (also the attention's `[H, hd]` ones),
  norms, embedding tables, position embeddings, CLS / register / slot / probe tokens
  or the log-temperature."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(train_config.grad_clip_norm),
      optax.adamw(learning_rate_schedule(train_config),
                  weight_decay=train_config.weight_decay, mask=decay_mask))


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, replicated: Any) -> Any:
  """Moments sharded like their params (FSDP shards them too); counters replicated."""
  return optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt_state,
                               param_shardings, transform_non_params=lambda _: replicated)
