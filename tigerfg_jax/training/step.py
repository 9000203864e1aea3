"""The training objective and the (unjitted) update function.

`train.py` jits `make_update_fn(...)` with explicit shardings. Everything here is a pure
function of (state, teacher params, batch): the per-step PRNG key is folded from the
state's key and step, so a resumed run draws the same randomness.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from tigerfg_jax import losses


# `fold_in` data of the device augmentation's key (the loss uses the step key itself).
_AUGMENT_STREAM = 1


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint needs besides the data iterator state.

  step: int32 scalar. params: float32 tree. opt_state: optax state.
  rng: uint32 `[2]` raw PRNG key (raw so that Orbax saves it as a plain array).
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def region_mask(batch: dict[str, jax.Array]) -> jax.Array:
  """bool `[B, N]`: patches the ground-truth box covers (all of them without a box)."""
  return batch["spatial_target"] > 0


def loss_terms(student: dict[str, jax.Array], teacher: dict[str, jax.Array] | None,
               batch: dict[str, jax.Array],
               loss_config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Each loss term (float32 scalars) from the student's and teacher's forward passes.

  `student` / `teacher` are `TigerFG.__call__` outputs over the global batch.
  """
  positives = batch["group"][:, None] == batch["group"][None, :]
  terms = {"infonce": losses.infonce(student["query_emb"], student["item_emb"],
                                     student["temperature"], positives=positives)}
  attention = jnp.mean(student["attention"], axis=1)
  if teacher is not None:
    student_logits = losses.similarity_logits(
        student["query_emb"], student["item_emb"], student["temperature"])
    teacher_logits = losses.similarity_logits(
        teacher["query_emb"], teacher["item_emb"], teacher["temperature"])
    terms["similarity_kl"] = losses.similarity_kl(
        student_logits, teacher_logits, loss_config.kd_temperature)
  if loss_config.spatial_target == "teacher" and teacher is not None:
    target = jnp.mean(teacher["attention"], axis=1)
    terms["spatial_map"] = losses.spatial_map_loss(attention, target)
  else:
    terms["spatial_map"] = losses.spatial_map_loss(
        attention, batch["spatial_target"], valid=batch["has_box"])
  return terms


def total_loss(terms: dict[str, jax.Array],
               loss_config: ml_collections.ConfigDict) -> jax.Array:
  weights = {"infonce": loss_config.w_infonce, "similarity_kl": loss_config.w_sim,
             "spatial_map": loss_config.w_spatial}
  return sum(weights[name] * value for name, value in terms.items())


def make_loss_fn(model: nn.Module, teacher_model: nn.Module | None, stage: str,
                 loss_config: ml_collections.ConfigDict) -> Callable[..., Any]:
  """`loss_fn(params, teacher_params, batch, rng) -> (loss, (terms, temperature))`.

  The `teacher` stage pools its items from the ground-truth region (privileged); the
  student stages see the whole item image. The teacher's forward pass is frozen.
  """
  def loss_fn(params, teacher_params, batch, rng):
    student_region = region_mask(batch) if stage == "teacher" else None
    student = model.apply({"params": params}, batch, region_mask=student_region,
                          train=True, rngs={"dropout": rng})
    teacher = None
    if teacher_model is not None:
      teacher = jax.lax.stop_gradient(teacher_model.apply(
          {"params": teacher_params}, batch, region_mask=region_mask(batch)))
    terms = loss_terms(student, teacher, batch, loss_config)
    return total_loss(terms, loss_config), (terms, student["temperature"])
  return loss_fn


def make_update_fn(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
                   augment: Callable[..., Any] | None = None) -> Callable[..., Any]:
  """`update(state, teacher_params, batch) -> (state, measurements)`.

  `augment(batch, rng) -> batch` (e.g. `data.device_augment.augment_queries`) runs on
  the device first, with its own key folded from the step's.
  """
  def update(state: TrainState, teacher_params: Any, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if augment is not None:
      batch = augment(batch, jax.random.fold_in(rng, _AUGMENT_STREAM))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (terms, temperature)), grads = grad_fn(state.params, teacher_params, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    measurements = dict(terms, loss=loss, temperature=temperature,
                        l2_grads=optax.tree.norm(grads),
                        l2_params=optax.tree.norm(params),
                        l2_updates=optax.tree.norm(updates))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, measurements
  return update
