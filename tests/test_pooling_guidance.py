"""TextGuidedPooling really is text guided.

Toy item "images": 16 patch tokens holding two distinct objects (3 patches each, at
random places) on a noisy background, and two titles, one naming each object. After a
few Adam steps that reward attention on the named object, the attention map must put
most of its mass on the titled object for both titles, on layouts it never saw. A
pooling whose map ignores the title gives the same map for both titles, so its masses
on the two objects sum to at most 1: it cannot pass the > 0.6-for-both test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tigerfg_jax.models import pooling

PATCHES, WIDTH, TEXT_WIDTH, OBJECT_PATCHES = 16, 32, 16, 3


def _scene(key: jax.Array, layouts: int):
  """Each layout twice, once per title. Returns the pooling inputs and the bool
  `[2 * layouts, N]` mask of the titled object's patches."""
  garbage_key, noise_key, place_key = jax.random.split(key, 3)
  # Fixed across calls: the objects' looks and the title words.
  obj_a, obj_b = jax.random.normal(jax.random.key(1), (2, WIDTH))
  bos, word_a, word_b, eos = jax.random.normal(jax.random.key(2), (4, TEXT_WIDTH))
  order = jnp.argsort(jax.random.uniform(place_key, (layouts, PATCHES)), axis=1)
  rank = jnp.argsort(order, axis=1)
  on_a = rank < OBJECT_PATCHES
  on_b = (rank >= OBJECT_PATCHES) & (rank < 2 * OBJECT_PATCHES)
  patches = (0.5 * jax.random.normal(noise_key, (layouts, PATCHES, WIDTH))
             + on_a[..., None] * obj_a + on_b[..., None] * obj_b)
  patches = jnp.concatenate([patches, patches])
  # The 4th token is padding: masked, so its (random) content must not matter.
  garbage = jax.random.normal(garbage_key, (TEXT_WIDTH,))
  titles = jnp.concatenate([
      jnp.broadcast_to(jnp.stack([bos, word, eos, garbage]), (layouts, 4, TEXT_WIDTH))
      for word in (word_a, word_b)])
  title_mask = jnp.broadcast_to(jnp.array([True, True, True, False]), (2 * layouts, 4))
  named = jnp.concatenate([on_a, on_b])
  return (patches.mean(axis=1), patches, titles, title_mask), named


def test_attention_follows_the_title():
  module = pooling.TextGuidedPooling(num_slots=2, num_heads=2, mlp_dim=64)
  params = jax.jit(module.init)(
      jax.random.key(3), jnp.zeros((1, WIDTH)), jnp.zeros((1, PATCHES, WIDTH)),
      jnp.zeros((1, 4, TEXT_WIDTH)), jnp.ones((1, 4), bool))["params"]
  optimizer = optax.adam(3e-3)

  def mass_on_named(params, key, layouts):
    inputs, named = _scene(key, layouts)
    attention = module.apply({"params": params}, *inputs)["attention"].mean(axis=1)
    return jnp.sum(attention * named, axis=-1)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(lambda p: -jnp.mean(jnp.log(mass_on_named(p, key, 32))))(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  evaluate = jax.jit(mass_on_named, static_argnums=2)
  before = np.asarray(evaluate(params, jax.random.key(99), 64))
  # Untrained, the map is near uniform: about 3 / 16 of the mass on each object.
  assert before.mean() < 0.4, before.mean()
  opt_state = optimizer.init(params)
  for i in range(60):
    params, opt_state = step(params, opt_state, jax.random.key(100 + i))
  mass = np.asarray(evaluate(params, jax.random.key(99), 64))
  for_a, for_b = mass[:64].mean(), mass[64:].mean()
  assert for_a > 0.6 and for_b > 0.6, (for_a, for_b)
