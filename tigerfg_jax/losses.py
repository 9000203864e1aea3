"""Training losses (docs/ARCHITECTURE.md "Losses"): float32, stable, masked for padding.

Every function takes explicit arrays and returns a float32 scalar. The train step
gathers embeddings across the data axis first, so these see the global batch.
Log-probabilities always come from a masked log-softmax (max subtracted first, masked
entries contribute an exact 0), so temperatures down to 0.01 and logits of 1e4 give
finite losses and gradients; masked rows and columns get zero gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tigerfg_jax.models.normalize import l2_normalize

# `config.loss.spatial_target`: what the student's attention map is pulled towards,
# the ground-truth box's patch coverage or the privileged teacher's attention.
SPATIAL_TARGETS = ("box", "teacher")

# Attention probabilities are clamped to this before the log in `spatial_map_loss`: a
# patch the model ignores (probability 0 in float32) costs at most -log(1e-8) = 18.4
# nats per unit of target mass instead of inf.
ATTENTION_EPS = 1e-8

_NEG = jnp.finfo(jnp.float32).min


def _shift(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(x - peak, peak, log sum over mask of exp(x - peak))`, peak = max over mask.

  Subtracting the max first keeps the large part of the logits out of every later
  subtraction: at logits ~1e6 a float32 `x - logsumexp(x)` is off by a ulp of 1e6
  (0.06, i.e. 6% in probability), `(x - peak) - log(sum)` only by a ulp of the small
  result. An empty row gives very negative, finite values and zero gradient.
  """
  mask = jnp.broadcast_to(mask, x.shape)
  x = jnp.where(mask, x, _NEG)
  peak = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  shifted = x - peak
  total = jnp.sum(jnp.where(mask, jnp.exp(shifted), 0.0), axis=-1, keepdims=True)
  return shifted, peak, jnp.log(jnp.maximum(total, jnp.finfo(jnp.float32).tiny))


def _masked_log_softmax(x: jax.Array, mask: jax.Array) -> jax.Array:
  """float32 `[..., K]` log-softmax over the mask's entries (others: very negative)."""
  shifted, _, log_total = _shift(x, mask)
  return shifted - log_total


def _masked_logsumexp(x: jax.Array, mask: jax.Array) -> jax.Array:
  """float32 `[...]` log-sum-exp over the mask's entries of `[..., K]`."""
  _, peak, log_total = _shift(x, mask)
  return (peak + log_total)[..., 0]


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `values` where `mask` (0 when nothing is selected)."""
  mask = jnp.broadcast_to(mask, values.shape)
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1)


def _kl_rows(teacher_log_probs: jax.Array, student_log_probs: jax.Array,
             mask: jax.Array) -> jax.Array:
  """`sum_j p_t (log p_t - log p_s)` over the last axis, masked; 0 log 0 = 0."""
  p_teacher = jnp.where(mask, jnp.exp(teacher_log_probs), 0.0)
  terms = jnp.where(p_teacher > 0,
                    p_teacher * (teacher_log_probs - student_log_probs), 0.0)
  return jnp.sum(terms, axis=-1)


def similarity_logits(query_emb: jax.Array, item_emb: jax.Array,
                      temperature: jax.Array | float) -> jax.Array:
  """float32 `[B, M]` = `q @ i.T / tau` from `[B, E]` and `[M, E]` embeddings.

  Full float32 matmul precision: at tau = 0.01 a bf16-pass error of 1e-3 in a cosine
  would move a logit by 0.1.
  """
  products = jnp.matmul(query_emb.astype(jnp.float32), item_emb.astype(jnp.float32).T,
                        precision=jax.lax.Precision.HIGHEST)
  return products / jnp.asarray(temperature, jnp.float32)


def infonce(query_emb: jax.Array, item_emb: jax.Array, temperature: jax.Array | float,
            positives: jax.Array | None = None, valid: jax.Array | None = None,
            hard_negatives: jax.Array | None = None,
            hard_valid: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE with several positives per row (L_q2i, L_i2v, L_v2t).

  With `s = q @ i.T / tau`, query row r costs
  `-log(sum_{p in P_r} exp s_rp / sum_j exp s_rj)` (the multi-positive form of
  Khosla et al. 2020's "L_out": all positives share one softmax, so a query with
  three correct items is not pushed to prefer one of them); item column c costs the
  same over `s.T`. Rows (columns) with no positive among the valid entries are left
  out of their direction's mean.

  Hard negatives are extra candidates of one query row only (TIGER-FG's
  image-text-mismatch negatives: row r's own item image pooled under other titles):
  `q_r . h_rk / tau` joins row r's softmax in the query->item direction, never as a
  positive.

  Args:
    query_emb: `[B, E]` L2-normalised.
    item_emb: `[B, E]` L2-normalised.
    temperature: scalar tau.
    positives: bool `[B, B]`, `positives[r, c]`: item c is a positive of query r
      (default: the diagonal).
    valid: bool `[B]` (default all True); False rows are padding: excluded both as
      anchors and as candidates.
    hard_negatives: `[B, K, E]` L2-normalised, or None.
    hard_valid: bool `[B, K]` (default all True): False where `h_rk` is no negative
      of row r (e.g. its title belongs to a positive).

  Returns:
    float32 scalar, the mean of the query->item and item->query losses.
  """
  logits = similarity_logits(query_emb, item_emb, temperature)
  size = logits.shape[0]
  if logits.shape != (size, size):
    raise ValueError(f"infonce needs as many queries as items; got {logits.shape}")
  positives = (jnp.eye(size, dtype=bool) if positives is None
               else jnp.asarray(positives, bool))
  valid = jnp.ones((size,), bool) if valid is None else jnp.asarray(valid, bool)
  pairs = valid[:, None] & valid[None, :]

  def one_direction(scores: jax.Array, is_positive: jax.Array,
                    candidates: jax.Array) -> jax.Array:
    is_positive = is_positive & candidates
    log_probs = _masked_log_softmax(scores, candidates)
    loss = -_masked_logsumexp(log_probs, is_positive)
    return _masked_mean(loss, valid & jnp.any(is_positive, axis=1))

  forward_scores, forward_positives, forward_candidates = logits, positives, pairs
  if hard_negatives is not None:
    hard_logits = jnp.einsum(
        "be,bke->bk", query_emb.astype(jnp.float32), hard_negatives.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST) / jnp.asarray(temperature, jnp.float32)
    extra = hard_logits.shape[1]
    hard_ok = (jnp.ones((size, extra), bool) if hard_valid is None
               else jnp.asarray(hard_valid, bool)) & valid[:, None]
    forward_scores = jnp.concatenate([logits, hard_logits], axis=1)
    forward_positives = jnp.concatenate(
        [positives, jnp.zeros((size, extra), bool)], axis=1)
    forward_candidates = jnp.concatenate([pairs, hard_ok], axis=1)
  return 0.5 * (one_direction(forward_scores, forward_positives, forward_candidates)
                + one_direction(logits.T, positives.T, pairs))


def similarity_kl(student_logits: jax.Array, teacher_logits: jax.Array,
                  temperature: jax.Array | float, valid: jax.Array | None = None,
                  valid_columns: jax.Array | None = None) -> jax.Array:
  """L_SDD: `T^2 * mean_i KL(softmax(teacher_i / T) || softmax(student_i / T))`.

  The teacher is under `stop_gradient`; T^2 keeps the gradient scale independent of T
  (Hinton et al. 2015).

  Args:
    student_logits: `[B, M]`.
    teacher_logits: `[B, M]`.
    temperature: scalar T.
    valid: bool `[B]`; False rows are left out of the mean.
    valid_columns: bool `[M]`; False columns (padded candidates) are left out of
      both softmaxes.

  Returns:
    float32 scalar.
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  student = student_logits.astype(jnp.float32) / temperature
  teacher = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
  rows, columns = student.shape
  columns_ok = (jnp.ones((columns,), bool) if valid_columns is None
                else jnp.asarray(valid_columns, bool))
  student_log_probs = _masked_log_softmax(student, columns_ok)
  teacher_log_probs = _masked_log_softmax(teacher, columns_ok)
  kl = _kl_rows(teacher_log_probs, student_log_probs, columns_ok)
  rows_ok = jnp.ones((rows,), bool) if valid is None else jnp.asarray(valid, bool)
  return temperature**2 * _masked_mean(kl, rows_ok)


def spatial_map_loss(attention: jax.Array, target: jax.Array,
                     valid: jax.Array | None = None) -> jax.Array:
  """`mean_i KL(target_i || attention_i)` between maps over the N patches.

  Args:
    attention: `[B, N]` (or `[B, H, N]`, averaged over heads first), rows sum to 1.
      Clamped to `ATTENTION_EPS` before the log.
    target: `[B, N]`, rows sum to 1 (the box on the patch grid or a teacher's map);
      zeros allowed (0 log 0 = 0).
    valid: bool `[B]`; False rows (e.g. queries without a box) are left out.

  Returns:
    float32 scalar.
  """
  attention = attention.astype(jnp.float32)
  if attention.ndim == 3:
    attention = jnp.mean(attention, axis=1)
  target = target.astype(jnp.float32)
  if attention.shape != target.shape:
    raise ValueError(f"spatial_map_loss: attention {attention.shape} and target "
                     f"{target.shape} must both be [B, N]")
  log_target = jnp.log(jnp.where(target > 0, target, 1.0))
  log_attention = jnp.log(jnp.maximum(attention, ATTENTION_EPS))
  kl = _kl_rows(log_target, log_attention, target > 0)
  rows_ok = (jnp.ones(kl.shape, bool) if valid is None else jnp.asarray(valid, bool))
  return _masked_mean(kl, rows_ok)


def spatial_relation_loss(student_patches: jax.Array, teacher_patches: jax.Array,
                          region_mask: jax.Array, temperature: float = 0.1,
                          valid: jax.Array | None = None) -> jax.Array:
  """L_SRD: keep the teacher's relations among the target region's patches.

  For each patch i inside the box, `softmax_j(cos(x_i, x_j) / temperature)` over the
  other patches j inside the box, for the student's and the (frozen) teacher's patch
  tokens; the loss is `KL(teacher row || student row)` averaged over the in-box rows
  of the valid examples. The diagonal (a patch with itself: cosine 1 for both models)
  is left out: it carries no relation and would dominate a low-temperature softmax.
  Rows with no other in-box patch are left out. The widths of the two token sets may
  differ.

  Args:
    student_patches: `[B, N, Ds]`.
    teacher_patches: `[B, N, Dt]` (under `stop_gradient`).
    region_mask: bool `[B, N]`, True on the patches inside the target box.
    temperature: softmax temperature of the cosine similarities.
    valid: bool `[B]`; False examples are left out.

  Returns:
    float32 scalar.
  """
  region_mask = jnp.asarray(region_mask, bool)
  num_patches = region_mask.shape[1]
  others = region_mask[:, None, :] & ~jnp.eye(num_patches, dtype=bool)[None]

  def relation_log_probs(patches: jax.Array) -> jax.Array:
    unit = l2_normalize(patches)
    cosine = jnp.einsum("bnd,bmd->bnm", unit, unit,
                        precision=jax.lax.Precision.HIGHEST) / temperature
    return _masked_log_softmax(cosine, others)

  student = relation_log_probs(student_patches)
  teacher = relation_log_probs(jax.lax.stop_gradient(teacher_patches))
  kl = _kl_rows(teacher, student, others)
  rows_ok = region_mask & jnp.any(others, axis=-1)
  if valid is not None:
    rows_ok = rows_ok & jnp.asarray(valid, bool)[:, None]
  return _masked_mean(kl, rows_ok)
