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
from tigerfg_jax.models import patch_teacher as patch_teacher_lib
from tigerfg_jax.models import towers


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


# The objective's terms, as `metrics.jsonl` / TensorBoard name them; term t is weighted
# by `config.loss.w_<t>` and computed only when that weight is > 0. `t2i` and `t2modal`
# are the text queries' (docs/ARCHITECTURE.md "Text queries").
LOSS_TERMS = ("q2i", "v2t", "i2v", "sdd", "srd", "spatial_map", "t2i", "t2modal")
# The terms that read the image query tower's embeddings.
IMAGE_QUERY_TERMS = ("q2i", "i2v", "sdd")
# The text terms; a batch carries text queries when one of them is active.
TEXT_QUERY_TERMS = ("t2i", "t2modal")
# The image-query objective's terms (configs/distill.py turns all of them on).
IMAGE_TERMS = tuple(t for t in LOSS_TERMS if t not in TEXT_QUERY_TERMS)
# The item's single-modality embeddings `t2modal` aligns the text query with (the
# 'beyond_text' and 'smar' fusions return them).
MODALITY_EMBEDDINGS = ("item_text_emb", "item_image_emb", "item_mm_emb")


def region_mask(batch: dict[str, jax.Array]) -> jax.Array:
  """bool `[B, N]`: patches the ground-truth box covers (all of them without a box)."""
  return batch["spatial_target"] > 0


def active_terms(loss_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return tuple(t for t in LOSS_TERMS if loss_config[f"w_{t}"] > 0)


def uses_text_queries(loss_config: ml_collections.ConfigDict) -> bool:
  """Whether the objective reads text queries (the batches must carry them)."""
  return any(t in TEXT_QUERY_TERMS for t in active_terms(loss_config))


def uses_image_queries(loss_config: ml_collections.ConfigDict) -> bool:
  """Whether the objective reads the image query tower."""
  terms = active_terms(loss_config)
  return (any(t in IMAGE_QUERY_TERMS for t in terms)
          or ("v2t" in terms and loss_config.v2t_query))


def teacher_views(loss_config: ml_collections.ConfigDict,
                  has_patch_teacher: bool = False) -> dict[str, bool]:
  """Which frozen forward passes the distill stage's terms read.

  `crop`: the privileged teacher on the ground-truth crops (`L_SDD`, `L_i2v`).
  `full`: the teacher on the whole item image, pooling from the box (its attention
  map for `spatial_target='teacher'`; its patch tokens for `L_SRD` when no separate
  patch teacher is loaded).
  """
  terms = active_terms(loss_config)
  return dict(
      crop="sdd" in terms or "i2v" in terms,
      full=(("spatial_map" in terms and loss_config.spatial_target == "teacher")
            or ("srd" in terms and not has_patch_teacher)))


def text_positives(batch: dict[str, jax.Array]) -> jax.Array:
  """bool `[B, B]`: row j's item is relevant to row i's text query (`text_relevant`
  int32 `[B, P]` holds those item rows, `item_row` int32 `[B]` each row's item); False
  on rows without a text query (`text_valid`)."""
  listed = jnp.any(batch["text_relevant"][:, :, None] == batch["item_row"][None, None, :],
                   axis=1)
  return listed & batch["text_valid"][:, None]


def same_title(batch: dict[str, jax.Array]) -> jax.Array:
  """bool `[B, B]`: the two rows' titles are the same token sequence."""
  tokens = jnp.where(batch["title_mask"], batch["title_tokens"], -1)
  return jnp.all(tokens[:, None, :] == tokens[None, :, :], axis=-1)


def title_swap_negatives(batch: dict[str, jax.Array], positives: jax.Array,
                         count: int) -> jax.Array:
  """bool `[B, K]`: row r re-pooled under partner k's title is a negative of row r.

  Not when the partner's title belongs to one of r's positives (same product group)
  or is r's own title word for word (then the re-pooled item *is* r's item).
  """
  partners = towers.swap_partners(positives.shape[0], count)
  same = same_title(batch)
  return ~(jnp.take_along_axis(positives, partners, axis=1)
           | jnp.take_along_axis(same, partners, axis=1))


def loss_terms(student: dict[str, jax.Array], teacher: dict[str, dict[str, jax.Array]],
               batch: dict[str, jax.Array],
               loss_config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Each active loss term (float32 scalars, `LOSS_TERMS` names).

  Args:
    student: `TigerFG.__call__` outputs over the global batch (with `swap_emb` when
      `loss.hard_negatives` > 0).
    teacher: the frozen views `teacher_views` asks for: `crop` (the teacher's
      `TigerFG.__call__` on the ground-truth crops), `full` (on the whole item image,
      pooling from the box) and/or `patches` (`[B, N, Dt]` patch-teacher tokens).
    batch: the training batch (docs/ARCHITECTURE.md "Batches"; with `text_tokens`,
      `text_mask`, `text_valid`, `text_relevant` and `item_row` when a text term is
      active: `text_positives`).
    loss_config: `config.loss`.

  `v2t` aligns the title with the student's pooled region and, with
  `loss.v2t_query`, with the query (a photo of the target region): the mean of the
  two InfoNCE terms.
  `t2i` is the text query against the searched item embedding (SMAR: the gated one);
  `t2modal` averages the text query's InfoNCE against each single-modality item
  embedding the fusion returns (SMAR's multi-task alignment, Beyond Text's alignment
  with the product text and image); fusions without them have no `t2modal` term.
  """
  terms = active_terms(loss_config)
  positives = batch["group"][:, None] == batch["group"][None, :]
  tau = student["temperature"]
  hard, hard_ok = None, None
  if loss_config.hard_negatives:
    hard = student["swap_emb"]
    hard_ok = title_swap_negatives(batch, positives, loss_config.hard_negatives)
  out = {}
  if "q2i" in terms:
    out["q2i"] = losses.infonce(student["query_emb"], student["item_emb"], tau,
                                positives=positives, hard_negatives=hard,
                                hard_valid=hard_ok)
  if "v2t" in terms:
    regions = [student["region_emb"]]
    if loss_config.v2t_query:
      regions.append(student["query_emb"])
    out["v2t"] = sum(losses.infonce(region, student["title_emb"], tau,
                                    positives=positives | same_title(batch))
                     for region in regions) / len(regions)
  if "i2v" in terms:
    out["i2v"] = losses.infonce(teacher["crop"]["item_emb"], student["item_emb"], tau,
                                positives=positives, hard_negatives=hard,
                                hard_valid=hard_ok)
  if "sdd" in terms:
    crop = teacher["crop"]
    out["sdd"] = losses.similarity_kl(
        losses.similarity_logits(student["query_emb"], student["item_emb"], tau),
        losses.similarity_logits(crop["query_emb"], crop["item_emb"], crop["temperature"]),
        loss_config.kd_temperature)
  if "srd" in terms:
    patches = teacher["patches"] if "patches" in teacher else teacher["full"]["item_patches"]
    out["srd"] = losses.spatial_relation_loss(
        student["item_patches"], patches, region_mask(batch),
        temperature=loss_config.srd_temperature, valid=batch["has_box"])
  modalities = [k for k in MODALITY_EMBEDDINGS if k in student]
  if "t2i" in terms or ("t2modal" in terms and modalities):
    relevant = text_positives(batch)
  if "t2i" in terms:
    out["t2i"] = losses.infonce(student["text_query_emb"], student["item_emb"], tau,
                                positives=relevant, valid=batch["text_valid"])
  if "t2modal" in terms and modalities:
    out["t2modal"] = sum(
        losses.infonce(student["text_query_unit"], student[k], tau,
                       positives=relevant, valid=batch["text_valid"])
        for k in modalities) / len(modalities)
  if "spatial_map" in terms:
    if loss_config.spatial_target == "teacher":
      target = jnp.mean(teacher["full"]["attention"], axis=1)
    else:
      target = batch["spatial_target"]
    out["spatial_map"] = losses.spatial_map_loss(student["attention"], target,
                                                 valid=batch["has_box"])
  return out


def total_loss(terms: dict[str, jax.Array],
               loss_config: ml_collections.ConfigDict) -> jax.Array:
  return sum(loss_config[f"w_{name}"] * value for name, value in terms.items())


def make_loss_fn(model: nn.Module, teacher_model: nn.Module | None, stage: str,
                 loss_config: ml_collections.ConfigDict,
                 patch_grid: int | None = None) -> Callable[..., Any]:
  """`loss_fn(params, frozen, batch, rng) -> (loss, (terms, temperature))`.

  The `teacher` stage is privileged: its items are the ground-truth crops
  (`target_image`); its `spatial_map` term reads one more look, at the whole item
  image, whose attention learns the box. The student stages see the whole item image. `frozen` holds what
  stays frozen: `teacher` (the params of `teacher_model`) and, with `patch_grid` (the
  student's patch grid side), `patch_teacher` (a `models.patch_teacher.PatchTeacher`,
  L_SRD's reference); only the forward passes some active term reads run
  (`teacher_views`). Without an image-query term the query tower does not run.
  """
  views = teacher_views(loss_config, patch_grid is not None)
  swap = loss_config.hard_negatives
  image_queries = uses_image_queries(loss_config)

  def loss_fn(params, frozen, batch, rng):
    student_batch = batch
    if stage == "teacher":
      student_batch = dict(batch, item_image=batch["target_image"])
    if not image_queries:
      student_batch = {k: v for k, v in student_batch.items() if k != "query_image"}
    student = model.apply({"params": params}, student_batch, swap_titles=swap,
                          train=True, rngs={"dropout": rng})
    if stage == "teacher" and "spatial_map" in active_terms(loss_config):
      # The spatial target is the box in the whole item image: the map that follows
      # it is the item image's, not the crop's (one more look, item side only).
      whole = model.apply({"params": params},
                          {k: batch[k] for k in ("item_image", "title_tokens", "title_mask")},
                          train=True, rngs={"dropout": rng})
      student = dict(student, attention=whole["attention"])
    teacher = {}
    if teacher_model is not None and views["crop"]:
      teacher["crop"] = teacher_model.apply(
          {"params": frozen["teacher"]}, dict(batch, item_image=batch["target_image"]))
    if teacher_model is not None and views["full"]:
      teacher["full"] = teacher_model.apply({"params": frozen["teacher"]}, batch,
                                            region_mask=region_mask(batch))
    if patch_grid is not None and "srd" in active_terms(loss_config):
      teacher["patches"] = patch_teacher_lib.patch_tokens(
          frozen["patch_teacher"], batch["item_image"], patch_grid)
    teacher = jax.lax.stop_gradient(teacher)
    terms = loss_terms(student, teacher, batch, loss_config)
    return total_loss(terms, loss_config), (terms, student["temperature"])
  return loss_fn


def make_update_fn(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation,
                   augment: Callable[..., Any] | None = None) -> Callable[..., Any]:
  """`update(state, frozen, batch) -> (state, measurements)`.

  `frozen`: the frozen parameters the loss reads (`make_loss_fn`), or None.

  `augment(batch, rng) -> batch` (e.g. `data.device_augment.augment_queries`) runs on
  the device first, with its own key folded from the step's.
  """
  def update(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    if augment is not None:
      batch = augment(batch, jax.random.fold_in(rng, _AUGMENT_STREAM))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (terms, temperature)), grads = grad_fn(state.params, frozen, batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    measurements = dict(terms, loss=loss, temperature=temperature,
                        l2_grads=optax.tree.norm(grads),
                        l2_params=optax.tree.norm(params),
                        l2_updates=optax.tree.norm(updates))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, measurements
  return update
