"""The objective: gradients vs finite differences, frozen teacher, each term's wiring
against NumPy, title-swap negatives, and which teacher passes run."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_helpers
from tests.test_losses import infonce_reference, spatial_map_reference
from tigerfg_jax import sharding
from tigerfg_jax.training import step as step_lib
from tigerfg_jax.training import trainer


def _setup(stage="distill", **overrides):
  config = train_helpers.micro_config(stage, **overrides)
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.make_trainer(config, mesh, train_helpers.VOCAB_SIZE)
  state = built.init(jax.random.PRNGKey(0))
  batch = {k: jnp.asarray(v) for k, v in train_helpers.random_batch(config, 6, 0).items()}
  return config, built, state, batch


def test_gradient_matches_finite_differences():
  config, trainer, state, batch = _setup(**train_helpers.NO_TEACHER)
  assert config.loss.hard_negatives > 0 and config.loss.w_v2t > 0
  loss_fn = step_lib.make_loss_fn(trainer.model, None, config.stage, config.loss)
  rng = jax.random.PRNGKey(1)

  @jax.jit
  def loss_of(params):
    return loss_fn(params, None, batch, rng)[0]

  params = state.params
  grads = jax.jit(jax.grad(loss_of))(params)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  for key in keys:
    direction = treedef.unflatten([
        jax.random.normal(k, leaf.shape) for k, leaf in
        zip(jax.random.split(key, len(leaves)), leaves)])
    norm = jnp.sqrt(sum(jnp.sum(d ** 2) for d in jax.tree.leaves(direction)))
    direction = jax.tree.map(lambda d: d / norm, direction)
    eps = 1e-3
    plus = loss_of(jax.tree.map(lambda p, d: p + eps * d, params, direction))
    minus = loss_of(jax.tree.map(lambda p, d: p - eps * d, params, direction))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(jnp.vdot(g, d) for g, d in
                   zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=0.05, atol=2e-3)


def test_teacher_is_frozen_and_every_term_is_logged_and_weighted():
  # The teacher's attention is the spatial target and its ViT the patch teacher, so
  # both of its passes enter the loss.
  config, trainer, state, batch = _setup(**{"loss.spatial_target": "teacher"})
  frozen = {"teacher": jax.tree.map(lambda p: p + 0.01, state.params)}
  loss_fn = step_lib.make_loss_fn(trainer.model, trainer.model, "distill", config.loss)
  rng = jax.random.PRNGKey(0)
  (loss, (terms, _)), (student_grads, teacher_grads) = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(state.params, frozen, batch, rng)
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(teacher_grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(student_grads))
  assert set(terms) == {"q2i", "v2t", "i2v", "sdd", "srd", "spatial_map"}
  expected = sum(config.loss[f"w_{name}"] * float(value) for name, value in terms.items())
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  assert float(terms["sdd"]) > 0 and float(terms["srd"]) > 0  # teacher differs.


def _student_outputs(model, params, batch, swap):
  return model.apply({"params": params}, batch, swap_titles=swap)


def test_terms_match_numpy_references():
  """q2i (with the title-swap mask), v2t and i2v recomputed from the model outputs
  with loop-level float64 references and masks built here from the definitions."""
  config, built, state, batch = _setup(**{"loss.w_srd": 0.0})
  swap = config.loss.hard_negatives
  batch = dict(batch, group=jnp.asarray([0, 0, 1, 2, 3, 3], jnp.int32))
  # Rows 2 and 4 carry the same title, word for word.
  batch["title_tokens"] = batch["title_tokens"].at[4].set(batch["title_tokens"][2])
  batch["title_mask"] = batch["title_mask"].at[4].set(batch["title_mask"][2])
  student = _student_outputs(built.model, state.params, batch, swap)
  teacher_params = jax.tree.map(lambda p: p * 1.01, state.params)
  crop = built.model.apply({"params": teacher_params},
                           dict(batch, item_image=batch["target_image"]))
  terms = step_lib.loss_terms(student, {"crop": crop}, batch, config.loss)

  size = 6
  group = np.asarray(batch["group"])
  titles = [tuple(np.asarray(t)[np.asarray(m)]) for t, m in
            zip(batch["title_tokens"], batch["title_mask"])]
  positives = group[:, None] == group[None, :]
  same_title = np.array([[a == b for b in titles] for a in titles])
  hard_valid = np.zeros((size, swap), bool)
  for r, k in itertools.product(range(size), range(swap)):
    partner = (r + k + 1) % size
    hard_valid[r, k] = group[partner] != group[r] and titles[partner] != titles[r]
  assert not hard_valid[2, 1] and not hard_valid[0, 0]  # same title; same group.
  tau = float(student["temperature"])
  np.testing.assert_allclose(float(terms["q2i"]), infonce_reference(
      np.asarray(student["query_emb"]), np.asarray(student["item_emb"]), tau, positives,
      hard=np.asarray(student["swap_emb"]), hard_valid=hard_valid), rtol=1e-4)
  # L_v2t: the pooled region and the query (a photo of the target region) each
  # against the titles, averaged.
  assert config.loss.v2t_query
  title_emb = np.asarray(student["title_emb"])
  np.testing.assert_allclose(float(terms["v2t"]), np.mean([infonce_reference(
      np.asarray(student[region]), title_emb, tau, positives | same_title)
      for region in ("region_emb", "query_emb")]), rtol=1e-4)
  region_only = step_lib.loss_terms(student, {"crop": crop}, batch, type(config.loss)(
      dict(config.loss.to_dict(), v2t_query=False)))["v2t"]
  np.testing.assert_allclose(float(region_only), infonce_reference(
      np.asarray(student["region_emb"]), title_emb, tau, positives | same_title),
      rtol=1e-4)
  np.testing.assert_allclose(float(terms["i2v"]), infonce_reference(
      np.asarray(crop["item_emb"]), np.asarray(student["item_emb"]), tau, positives,
      hard=np.asarray(student["swap_emb"]), hard_valid=hard_valid), rtol=1e-4)


@pytest.mark.parametrize("mode", ["tiger", "clip_style"])
def test_swap_embeddings_are_the_items_pooled_under_the_partners_titles(mode):
  """All titles of an image are pooled in one pass (keys and values projected once);
  each must equal pooling that title alone."""
  config, built, state, batch = _setup(**{"model.mode": mode})
  student = _student_outputs(built.model, state.params, batch, 2)
  partner = 3  # row 1's second swap partner: (1 + 2) % 6.
  swapped_batch = dict(batch, title_tokens=batch["title_tokens"][jnp.asarray([partner])],
                       title_mask=batch["title_mask"][jnp.asarray([partner])],
                       item_image=batch["item_image"][1:2],
                       query_image=batch["query_image"][1:2])
  alone = _student_outputs(built.model, state.params, swapped_batch, 0)
  np.testing.assert_allclose(student["swap_emb"][1, 1], alone["item_emb"][0], atol=1e-5)


def test_title_swap_negatives_raise_the_loss_of_a_title_blind_model():
  """With the title encoder zeroed, every title encodes alike: re-pooling an item
  under another title gives its own embedding, so each valid hard negative scores
  as high as the positive and the loss rises (by the float64 reference's amount).
  A model that reads the title re-pools to other embeddings."""
  config, built, state, batch = _setup(**train_helpers.NO_TEACHER)
  loss_config = config.loss

  def q2i(params, hard_negatives):
    overrides = dict(loss_config.to_dict(), hard_negatives=hard_negatives, w_v2t=0.0,
                     w_spatial_map=0.0)
    outputs = _student_outputs(built.model, params, batch, hard_negatives)
    return float(step_lib.loss_terms(outputs, {}, batch,
                                     type(loss_config)(overrides))["q2i"]), outputs

  blind = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.zeros_like(p) if "text_encoder" in jax.tree_util.keystr(path)
      else p, state.params)
  plain, _ = q2i(blind, 0)
  with_hard, outputs = q2i(blind, 3)
  item = np.asarray(outputs["item_emb"])
  np.testing.assert_allclose(outputs["swap_emb"], np.repeat(item[:, None], 3, 1),
                             atol=1e-6)
  group = np.asarray(batch["group"])
  partners = (np.arange(6)[:, None] + np.arange(1, 4)[None]) % 6
  hard_valid = group[partners] != group[:, None]
  positives = group[:, None] == group[None, :]
  tau = float(outputs["temperature"])
  np.testing.assert_allclose(with_hard, infonce_reference(
      np.asarray(outputs["query_emb"]), item, tau, positives,
      hard=np.repeat(item[:, None], 3, 1), hard_valid=hard_valid), rtol=1e-4)
  assert with_hard > plain + 0.1
  _, reading = q2i(state.params, 3)
  assert float(jnp.min(jnp.abs(reading["swap_emb"] - reading["item_emb"][:, None])
                       .max(axis=-1))) > 1e-4


def test_spatial_target_teacher_leaves_rows_without_a_box_out():
  config, built, state, batch = _setup(**{"loss.spatial_target": "teacher"})
  student = _student_outputs(built.model, state.params, batch, 0)
  full = built.model.apply({"params": state.params}, batch,
                           region_mask=step_lib.region_mask(batch))
  loss_config = type(config.loss)(dict(config.loss.to_dict(), w_v2t=0.0, w_sdd=0.0,
                                       w_i2v=0.0, w_srd=0.0, hard_negatives=0))
  has_box = jnp.asarray([True, False, True, True, False, True])
  with_box = dict(batch, has_box=has_box)
  base = step_lib.loss_terms(student, {"full": full}, with_box, loss_config)["spatial_map"]
  noisy = dict(full, attention=full["attention"].at[1].set(
      jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(3), full["attention"][1].shape))))
  moved = step_lib.loss_terms(student, {"full": noisy}, with_box, loss_config)["spatial_map"]
  np.testing.assert_allclose(float(moved), float(base), rtol=1e-6)
  all_rows = step_lib.loss_terms(student, {"full": noisy}, batch, loss_config)
  assert abs(float(all_rows["spatial_map"]) - float(base)) > 1e-4


class _CountingTeacher:
  """Stands in for the teacher model and counts its forward passes."""

  def __init__(self, model):
    self.model, self.calls = model, 0

  def apply(self, *args, **kwargs):
    self.calls += 1
    return self.model.apply(*args, **kwargs)


@pytest.mark.parametrize("overrides,calls", [
    ({"loss.w_sdd": 0.0, "loss.w_i2v": 0.0, "loss.w_srd": 0.0}, 0),
    ({"loss.w_i2v": 0.0, "loss.w_srd": 0.0}, 1),     # the crop pass (L_SDD) only.
    ({"loss.w_sdd": 0.0, "loss.w_i2v": 0.0}, 1),     # the full pass (L_SRD) only.
    ({}, 2),
])
def test_the_teacher_runs_only_the_passes_a_term_reads(overrides, calls):
  config, built, state, batch = _setup(**overrides)
  teacher = _CountingTeacher(built.model)
  loss_fn = step_lib.make_loss_fn(built.model, teacher, "distill", config.loss)
  loss, (terms, _) = loss_fn(state.params, {"teacher": state.params}, batch,
                             jax.random.PRNGKey(0))
  assert teacher.calls == calls
  assert np.isfinite(float(loss)) and set(terms) == set(step_lib.active_terms(config.loss))


def test_the_query_tower_runs_for_a_v2t_that_reads_the_query():
  config = train_helpers.micro_config(**{"loss.w_q2i": 0.0, **train_helpers.NO_TEACHER})
  assert config.loss.w_v2t > 0 and config.loss.v2t_query
  assert step_lib.uses_image_queries(config.loss)
  config.loss.v2t_query = False
  assert not step_lib.uses_image_queries(config.loss)


def test_the_teacher_stage_retrieves_crops_and_grounds_titles_in_the_whole_image():
  """Stage 1 is privileged: its retrieval terms read the ground-truth crops
  (`target_image`) alone, and its spatial map is the attention on the whole item
  image (not on the crop) against the box's target."""
  config, built, state, batch = _setup("teacher")
  assert config.loss.w_spatial_map > 0
  loss_fn = step_lib.make_loss_fn(built.model, None, "teacher", config.loss)
  rng = jax.random.PRNGKey(0)

  def terms_of(changed):
    return {k: float(v) for k, v in loss_fn(state.params, None, changed, rng)[1][0].items()}

  terms = terms_of(batch)
  assert set(terms) == {"q2i", "v2t", "spatial_map"}
  whole = built.model.apply({"params": state.params},
                            {k: batch[k] for k in ("item_image", "title_tokens", "title_mask")})
  np.testing.assert_allclose(terms["spatial_map"], spatial_map_reference(
      np.asarray(whole["attention"]).mean(axis=1), np.asarray(batch["spatial_target"])),
      rtol=1e-4)
  other_full = terms_of(dict(batch, item_image=jnp.zeros_like(batch["item_image"])))
  other_crop = terms_of(dict(batch, target_image=jnp.zeros_like(batch["target_image"])))
  for name in ("q2i", "v2t"):
    np.testing.assert_allclose(other_full[name], terms[name], rtol=1e-6)
    assert abs(other_crop[name] - terms[name]) > 1e-4
  np.testing.assert_allclose(other_crop["spatial_map"], terms["spatial_map"], rtol=1e-6)
  assert abs(other_full["spatial_map"] - terms["spatial_map"]) > 1e-4


def test_update_changes_params_and_counts_steps():
  _, trainer, state, batch = _setup(**train_helpers.NO_TEACHER, **train_helpers.ONE_LOOK)
  before = jax.tree.map(np.asarray, state.params)
  new_state, measurements = trainer.update(state, None, batch)
  assert int(new_state.step) == 1
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(new_state.params))]
  assert sum(changed) > 0.9 * len(changed)
  for key in ("loss", "q2i", "v2t", "spatial_map", "temperature", "l2_grads",
              "l2_params", "l2_updates"):
    assert np.isfinite(float(measurements[key])), key
