"""The objective: gradients vs finite differences, frozen teacher, logged loss terms."""

import jax
import jax.numpy as jnp
import numpy as np

from tests import train_helpers
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
  config, trainer, state, batch = _setup(**{"loss.w_spatial": 0.5})
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


def test_teacher_is_frozen_and_terms_are_separate():
  # The teacher's attention is the spatial target, so its map enters the loss too.
  config, trainer, state, batch = _setup(**{"loss.spatial_target": "teacher"})
  teacher_params = jax.tree.map(lambda p: p + 0.01, state.params)
  loss_fn = step_lib.make_loss_fn(trainer.model, trainer.model, "distill", config.loss)
  rng = jax.random.PRNGKey(0)
  (loss, (terms, _)), (student_grads, teacher_grads) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(state.params, teacher_params, batch, rng)
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(teacher_grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(student_grads))
  assert set(terms) == {"infonce", "similarity_kl", "spatial_map"}
  expected = (config.loss.w_infonce * terms["infonce"] + config.loss.w_sim
              * terms["similarity_kl"] + config.loss.w_spatial * terms["spatial_map"])
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
  assert float(terms["similarity_kl"]) > 0  # teacher differs from student.


def test_update_changes_params_and_counts_steps():
  _, trainer, state, batch = _setup()
  before = jax.tree.map(np.asarray, state.params)
  new_state, measurements = trainer.update(state, None, batch)
  assert int(new_state.step) == 1
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(new_state.params))]
  assert sum(changed) > 0.9 * len(changed)
  for key in ("loss", "infonce", "spatial_map", "temperature", "l2_grads", "l2_params",
              "l2_updates"):
    assert np.isfinite(float(measurements[key])), key
