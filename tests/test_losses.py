"""Losses against independent float64 NumPy references, masking and extreme values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tigerfg_jax import losses


def _unit_rows(rng: np.random.Generator, *shape: int) -> np.ndarray:
  x = rng.normal(size=shape)
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _log_softmax64(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  shifted = x - x.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _logsumexp64(values: list[float]) -> float:
  values = np.asarray(values, np.float64)
  peak = values.max()
  return float(peak + np.log(np.exp(values - peak).sum()))


def infonce_reference(q, i, tau, positives=None, valid=None, hard=None,
                      hard_valid=None) -> float:
  """Loop-level float64 multi-positive symmetric InfoNCE; `hard` `[B, K, E]` are
  extra candidates of their query row in the query->item direction."""
  q, i = q.astype(np.float64), i.astype(np.float64)
  size = len(q)
  positives = np.eye(size, dtype=bool) if positives is None else positives
  valid = np.ones(size, bool) if valid is None else valid
  scores = q @ i.T / tau
  directions = []
  for forward, s, pos in ((True, scores, positives), (False, scores.T, positives.T)):
    row_losses = []
    for r in range(size):
      if not valid[r]:
        continue
      candidates = [s[r, c] for c in range(size) if valid[c]]
      if forward and hard is not None:
        candidates += [float(q[r] @ hard[r, k].astype(np.float64)) / tau
                       for k in range(hard.shape[1])
                       if hard_valid is None or hard_valid[r, k]]
      targets = [s[r, c] for c in range(size) if valid[c] and pos[r, c]]
      if targets:
        row_losses.append(_logsumexp64(candidates) - _logsumexp64(targets))
    directions.append(np.mean(row_losses))
  return float(np.mean(directions))


def similarity_kl_reference(student, teacher, temperature) -> float:
  log_s = _log_softmax64(student / temperature)
  log_t = _log_softmax64(teacher / temperature)
  kl = (np.exp(log_t) * (log_t - log_s)).sum(axis=-1)
  return float(temperature**2 * kl.mean())


def spatial_map_reference(attention, target) -> float:
  attention, target = attention.astype(np.float64), target.astype(np.float64)
  rows = []
  for a, t in zip(attention, target):
    nz = t > 0
    rows.append(np.sum(t[nz] * np.log(t[nz] / a[nz])))
  return float(np.mean(rows))


def spatial_relation_reference(student, teacher, region, temperature) -> float:
  rows = []
  for b in range(len(region)):
    inside = np.flatnonzero(region[b])
    for i in inside:
      others = [j for j in inside if j != i]
      if not others:
        continue
      def row(x):
        x = x[b].astype(np.float64)
        x = x / np.linalg.norm(x, axis=-1, keepdims=True)
        return _log_softmax64(np.array([x[i] @ x[j] for j in others]) / temperature)
      log_t, log_s = row(teacher), row(student)
      rows.append(np.sum(np.exp(log_t) * (log_t - log_s)))
  return float(np.mean(rows))


@pytest.mark.parametrize("size,dim", [(3, 4), (8, 16), (13, 32)])
@pytest.mark.parametrize("tau", [1.0, 0.07, 0.01])
def test_infonce_matches_numpy(size, dim, tau):
  rng = np.random.default_rng(size * 100 + dim)
  q, i = _unit_rows(rng, size, dim), _unit_rows(rng, size, dim)
  got = losses.infonce(q, i, tau)
  np.testing.assert_allclose(got, infonce_reference(q, i, tau), rtol=2e-5, atol=2e-5)
  assert got.dtype == jnp.float32


@pytest.mark.parametrize("tau", [0.5, 0.01])
def test_infonce_multi_positive_matches_numpy(tau):
  rng = np.random.default_rng(7)
  size = 12
  group = rng.integers(0, 4, size)
  positives = group[:, None] == group[None, :]
  q, i = _unit_rows(rng, size, 8), _unit_rows(rng, size, 8)
  got = losses.infonce(q, i, tau, positives=positives)
  np.testing.assert_allclose(got, infonce_reference(q, i, tau, positives), rtol=2e-5,
                             atol=2e-5)
  # The multi-positive form is not the diagonal-only form.
  assert abs(float(got) - infonce_reference(q, i, tau)) > 1e-3


def test_infonce_padded_rows_change_nothing():
  rng = np.random.default_rng(3)
  real, padded = 6, 4
  q, i = _unit_rows(rng, real + padded, 8), _unit_rows(rng, real + padded, 8)
  group = np.concatenate([rng.integers(0, 3, real), np.zeros(padded, int)])
  positives = group[:, None] == group[None, :]
  valid = np.arange(real + padded) < real
  loss_fn = lambda q, i: losses.infonce(q, i, 0.05, positives=positives, valid=valid)
  got = loss_fn(q, i)
  alone = losses.infonce(q[:real], i[:real], 0.05, positives=positives[:real, :real])
  np.testing.assert_allclose(got, alone, rtol=1e-6)
  np.testing.assert_allclose(
      got, infonce_reference(q, i, 0.05, positives, valid), rtol=2e-5)
  grad_q, grad_i = jax.grad(loss_fn, argnums=(0, 1))(q, i)
  assert np.all(grad_q[real:] == 0) and np.all(grad_i[real:] == 0)
  assert np.any(grad_q[:real] != 0)


def test_infonce_gradient_finite_at_extreme_logits():
  rng = np.random.default_rng(0)
  # Norm-100 rows at tau 0.01: logits of order 1e6 (well past 1e4).
  q = 100 * _unit_rows(rng, 8, 4)
  i = 100 * _unit_rows(rng, 8, 4)
  loss, grads = jax.value_and_grad(losses.infonce, argnums=(0, 1))(q, i, 0.01)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("rows,cols", [(4, 4), (6, 10)])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.01])
def test_similarity_kl_matches_numpy(rows, cols, temperature):
  rng = np.random.default_rng(rows + cols)
  student = rng.normal(size=(rows, cols)).astype(np.float32) * 3
  teacher = rng.normal(size=(rows, cols)).astype(np.float32) * 3
  got = losses.similarity_kl(student, teacher, temperature)
  want = similarity_kl_reference(student, teacher, temperature)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * max(1, want))


def test_similarity_kl_zero_for_identical_and_teacher_frozen():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  np.testing.assert_allclose(losses.similarity_kl(logits, logits, 1.0), 0.0, atol=1e-6)
  teacher = rng.normal(size=(5, 7)).astype(np.float32)
  grad_student, grad_teacher = jax.grad(losses.similarity_kl, argnums=(0, 1))(
      logits, teacher, 2.0)
  assert np.all(grad_teacher == 0)
  assert np.any(grad_student != 0)


def test_similarity_kl_masks_rows_and_columns():
  rng = np.random.default_rng(2)
  student = rng.normal(size=(6, 8)).astype(np.float32)
  teacher = rng.normal(size=(6, 8)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 0, 1], bool)
  columns = np.array([1, 0, 1, 1, 1, 0, 1, 1], bool)
  got = losses.similarity_kl(student, teacher, 1.5, valid=valid, valid_columns=columns)
  want = similarity_kl_reference(student[valid][:, columns], teacher[valid][:, columns],
                                 1.5)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.01])
def test_similarity_kl_gradient_finite_at_extreme_logits(temperature):
  rng = np.random.default_rng(4)
  student = (1e4 * rng.choice([-1.0, 1.0], size=(4, 6))).astype(np.float32)
  teacher = (1e4 * rng.choice([-1.0, 1.0], size=(4, 6))).astype(np.float32)
  loss, grad = jax.value_and_grad(losses.similarity_kl)(student, teacher, temperature)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  want = similarity_kl_reference(student, teacher, temperature)
  np.testing.assert_allclose(loss, want, rtol=1e-3)


@pytest.mark.parametrize("rows,patches", [(3, 4), (5, 16), (2, 49)])
def test_spatial_map_loss_matches_numpy(rows, patches):
  rng = np.random.default_rng(rows * patches)
  attention = np.asarray(jax.nn.softmax(rng.normal(size=(rows, patches)) * 2))
  target = rng.random((rows, patches)) * (rng.random((rows, patches)) < 0.5)
  target[:, 0] += 0.1
  target = (target / target.sum(-1, keepdims=True)).astype(np.float32)
  got = losses.spatial_map_loss(attention, target)
  np.testing.assert_allclose(got, spatial_map_reference(attention, target), rtol=1e-5)
  heads = np.stack([attention, attention], axis=1)
  np.testing.assert_allclose(losses.spatial_map_loss(heads, target), got, rtol=1e-6)
  np.testing.assert_allclose(losses.spatial_map_loss(target, target), 0.0, atol=1e-6)


def test_spatial_map_loss_zero_attention_is_clamped_and_valid_masks():
  target = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], np.float32)
  attention = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]], np.float32)
  # Row 0: 0.5 log(0.5 / 1) + 0.5 log(0.5 / eps); row 1: log(1 / 0.5).
  row0 = 0.5 * np.log(0.5) + 0.5 * np.log(0.5 / losses.ATTENTION_EPS)
  row1 = np.log(2.0)
  loss, grad = jax.value_and_grad(losses.spatial_map_loss)(attention, target)
  np.testing.assert_allclose(loss, (row0 + row1) / 2, rtol=1e-5)
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(
      losses.spatial_map_loss(attention, target, valid=np.array([False, True])), row1,
      rtol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.1, 0.01])
def test_spatial_relation_loss_matches_numpy(temperature):
  rng = np.random.default_rng(5)
  batch, patches = 3, 9
  student = rng.normal(size=(batch, patches, 8)).astype(np.float32)
  teacher = rng.normal(size=(batch, patches, 12)).astype(np.float32)
  region = rng.random((batch, patches)) < 0.5
  region[0, :4] = True
  region[2] = False
  region[2, 3] = True  # A single in-box patch: no relation, no row.
  got = losses.spatial_relation_loss(student, teacher, region, temperature=temperature)
  want = spatial_relation_reference(student, teacher, region, temperature)
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_spatial_relation_loss_ignores_outside_box_and_is_zero_for_identical():
  rng = np.random.default_rng(6)
  student = rng.normal(size=(2, 16, 8)).astype(np.float32)
  teacher = rng.normal(size=(2, 16, 8)).astype(np.float32)
  region = np.zeros((2, 16), bool)
  region[:, 5:11] = True
  base = losses.spatial_relation_loss(student, teacher, region)
  changed = student.copy()
  changed[:, ~region[0]] = rng.normal(size=(2, 10, 8))
  np.testing.assert_allclose(losses.spatial_relation_loss(changed, teacher, region),
                             base, rtol=1e-6)
  grad = jax.grad(losses.spatial_relation_loss)(student, teacher, region)
  assert np.all(grad[:, ~region[0]] == 0) and np.any(grad[:, region[0]] != 0)
  np.testing.assert_allclose(
      losses.spatial_relation_loss(student, student, region), 0.0, atol=1e-6)
  valid = np.array([True, False])
  np.testing.assert_allclose(
      losses.spatial_relation_loss(student, teacher, region, valid=valid),
      losses.spatial_relation_loss(student[:1], teacher[:1], region[:1]), rtol=1e-6)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_infonce_hard_negatives_match_numpy(tau):
  rng = np.random.default_rng(7)
  q, i = _unit_rows(rng, 6, 16), _unit_rows(rng, 6, 16)
  hard = _unit_rows(rng, 6, 3, 16)
  hard_valid = rng.random((6, 3)) < 0.7
  valid = np.array([True] * 5 + [False])
  positives = np.eye(6, dtype=bool)
  positives[0, 1] = positives[1, 0] = True
  got = losses.infonce(q, i, tau, positives=positives, valid=valid, hard_negatives=hard,
                       hard_valid=hard_valid)
  want = infonce_reference(q, i, tau, positives, valid, hard, hard_valid)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert abs(float(got) - infonce_reference(q, i, tau, positives, valid)) > 1e-3
  none_valid = losses.infonce(q, i, tau, positives=positives, valid=valid,
                              hard_negatives=hard, hard_valid=np.zeros((6, 3), bool))
  np.testing.assert_allclose(none_valid, infonce_reference(q, i, tau, positives, valid),
                             rtol=2e-5)


def test_hard_negative_equal_to_the_positive_costs_log_two_more():
  """A title-blind model re-pools an item under another title to the same embedding:
  with one such hard negative, a query that scores its item far above every other
  candidate loses exactly log 2 in its direction (half of it in the mean)."""
  q = np.eye(4, dtype=np.float32)
  hard = q[:, None, :]
  plain = losses.infonce(q, q, 0.01)
  with_hard = losses.infonce(q, q, 0.01, hard_negatives=hard)
  np.testing.assert_allclose(float(with_hard) - float(plain), 0.5 * np.log(2), atol=1e-5)
