"""The encoders' accelerator options: `model.attention` kinds against a NumPy float64
reference, `model.remat` policies (same parameters, same loss and gradients), and the
bfloat16 model (bfloat16 matmuls, float32 outputs)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_helpers
from tests.test_models import _float64_params, _np_encoder, _random_variables
from tigerfg_jax.models import towers, transformer
from tigerfg_jax.training import step as step_lib

# Title lengths of the three rows: full, padded, empty (no real key: uniform attention).
LENGTHS = (6, 3, 0)


def _encoder_inputs() -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(len(LENGTHS), max(LENGTHS), 32)).astype(np.float32)
  mask = np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]
  return x, mask


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_kinds_match_numpy_reference(causal, dtype):
  x, mask = _encoder_inputs()
  encoders = {kind: transformer.Encoder(depth=2, num_heads=2, mlp_dim=64, attention=kind,
                                        causal=causal, dtype=jnp.dtype(dtype))
              for kind in transformer.ATTENTION_KINDS}
  variables = _random_variables(encoders["einsum"], x, mask, seed=1)
  for encoder in encoders.values():  # one parameter tree for both kinds
    shapes = nn.meta.unbox(jax.eval_shape(encoder.init, jax.random.key(0), x, mask))
    assert jax.tree.structure(shapes) == jax.tree.structure(variables)
  outputs = {kind: np.asarray(encoder.apply(variables, x, mask), np.float32)
             for kind, encoder in encoders.items()}
  per_query = np.broadcast_to(mask[:, None, :], (*mask.shape, mask.shape[1]))
  if causal:
    per_query = per_query & np.tril(np.ones((mask.shape[1],) * 2, bool))
  want = _np_encoder(x.astype(np.float64), _float64_params(variables), per_query,
                     "gelu", 1e-6)
  # bfloat16 keeps 8 bits of mantissa: ~0.4% per rounding, through two blocks, on
  # outputs of magnitude ~3 (measured: 0.026 at most).
  tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == "float32" else dict(atol=0.05)
  for kind, out in outputs.items():
    np.testing.assert_allclose(out, want, **tolerance, err_msg=kind)
  np.testing.assert_allclose(outputs["dot_product"], outputs["einsum"],
                             **(dict(atol=2e-6) if dtype == "float32" else tolerance))


def test_dot_product_kind_returns_no_weights_and_bad_kind_is_named():
  x, mask = _encoder_inputs()
  layer = transformer.MultiHeadAttention(2, kind="dot_product")
  variables = _random_variables(layer, x, x, mask, seed=0)
  out, weights = layer.apply(variables, x, x, mask)
  assert out.shape == x.shape and weights is None
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    transformer.MultiHeadAttention(2, kind="flash").init(jax.random.key(0), x, x)
  with pytest.raises(ValueError, match="config.model.remat='some'"):
    transformer.remat_block("some")


def _micro_config(**model):
  config = train_helpers.micro_config("distill", **train_helpers.NO_TEACHER)
  config.model.update(model)
  return config


@functools.lru_cache(maxsize=None)
def _loss_and_grads(remat: str):
  """(params, loss, grads, remat in the program) of the distill objective without a
  teacher (q2i with title-swap negatives, v2t, spatial map)."""
  config = _micro_config(remat=remat)
  model_config = config.model.copy_and_resolve_references()
  model_config.vocab_size = train_helpers.VOCAB_SIZE
  model = towers.TigerFG(model_config)
  batch = train_helpers.random_batch(config, 4, seed=0)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch))["params"]
  loss_fn = step_lib.make_loss_fn(model, None, "distill", config.loss)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, _), grads = jax.jit(grad_fn)(params, None, batch, jax.random.key(1))
  program = jax.make_jaxpr(grad_fn)(params, None, batch, jax.random.key(1))
  return params, loss, grads, "remat2[" in str(program)


@pytest.mark.parametrize("remat", [p for p in transformer.REMAT_POLICIES if p != "none"])
def test_remat_keeps_parameters_loss_and_gradients(remat):
  params, loss, grads, rematerialised = _loss_and_grads("none")
  assert not rematerialised
  remat_params, remat_loss, remat_grads, rematerialised = _loss_and_grads(remat)
  assert rematerialised
  # Same tree, names and initial values: a checkpoint restores under any policy.
  assert jax.tree.structure(remat_params) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, remat_params, params)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
  flat, _ = jax.tree_util.tree_flatten_with_path(grads)
  for (path, want), got in zip(flat, jax.tree.leaves(remat_grads)):
    # Recomputation refuses XLA's fusions, so sums run in another order: an element
    # that is a cancellation of larger terms differs by float32 rounding of the leaf's
    # scale, not of its own value.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                               err_msg=jax.tree_util.keystr(path))
  assert all(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(grads))


def _matmul_operand_dtypes(jaxpr) -> list[tuple[str, tuple, tuple]]:
  """(primitive, operand dtypes, operand shapes) of every dot_general and conv, nested
  jaxprs (jit, remat, custom_jvp) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars),
                    tuple(v.aval.shape for v in eqn.invars)))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _matmul_operand_dtypes(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _matmul_operand_dtypes(sub)
  return found


def test_bfloat16_model_computes_in_bfloat16_with_float32_outputs():
  config = _micro_config(dtype="bfloat16")
  model_config = config.model.copy_and_resolve_references()
  model_config.vocab_size = train_helpers.VOCAB_SIZE
  model = towers.TigerFG(model_config)
  batch = train_helpers.random_batch(config, 2, seed=0)
  # Shapes and dtypes only: nothing is compiled.
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), batch))["params"]
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(model.apply, {"params": params}, batch)
  for key in ("query_emb", "item_emb", "attention", "temperature"):
    assert out[key].dtype == jnp.float32, key
  assert out["item_patches"].dtype == jnp.bfloat16
  matmuls = _matmul_operand_dtypes(jax.make_jaxpr(model.apply)({"params": params},
                                                               batch).jaxpr)
  float32 = [m for m in matmuls if "float32" in m[1]]
  # The one float32 matmul: the title's mean over its real tokens, [B, L] x [B, L, Dt].
  length, width = config.model.max_title_len, 32
  assert float32 == [("dot_general", ("float32", "float32"), ((2, length),
                                                              (2, length, width)))]
  assert len(matmuls) > 20 and all(m[1] == ("bfloat16", "bfloat16")
                                   for m in matmuls if m not in float32)
