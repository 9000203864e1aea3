"""Model modules: shapes/dtypes, masking, the teacher's region mask, partitioning, and
the encoders' options (CLIP's) against NumPy float64 references."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tigerfg_jax import config_lib
from tigerfg_jax.models import partitioning, pooling, text, towers, transformer, vision

VOCAB = 40
BATCH = 2


def _model_config(**overrides):
  config = config_lib.experiment_config("distill", "micro").model
  config.vocab_size = VOCAB
  config.update(overrides)
  return config


def _batch(seed: int = 0, title_len: int = 16, size: int = 32) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  lengths = np.array([5, title_len])[:BATCH]
  mask = np.arange(title_len)[None, :] < lengths[:, None]
  return dict(
      query_image=rng.integers(0, 256, (BATCH, size, size, 3), np.uint8),
      item_image=rng.integers(0, 256, (BATCH, size, size, 3), np.uint8),
      title_tokens=np.where(mask, rng.integers(1, VOCAB, mask.shape),
                            0).astype(np.int32),
      title_mask=mask)


@functools.lru_cache(maxsize=None)
def _boxed_variables(mode: str):
  model = towers.TigerFG(_model_config(mode=mode))
  return jax.jit(model.init)({"params": jax.random.key(0)}, _batch())


def _params(mode: str = "tiger"):
  """Unboxed float32 variables; the same for every compute dtype."""
  return nn.meta.unbox(_boxed_variables(mode))


def _apply(dtype: str = "float32", mode: str = "tiger", method: str = "__call__"):
  """jitted `model.apply(params, *args)` of TigerFG's `method` (one per setting)."""
  return _compiled_apply(dtype, mode, method)


@functools.lru_cache(maxsize=None)
def _compiled_apply(dtype: str, mode: str, method: str):
  model = towers.TigerFG(_model_config(dtype=dtype, mode=mode))
  return jax.jit(functools.partial(model.apply, method=getattr(towers.TigerFG, method)))


def _embed_item(mode: str, batch: dict[str, np.ndarray], title_tokens=None,
                region_mask=None):
  """`embed_item` on `batch`'s item (another title if given). Always passes a region
  mask (default: all patches) so that every call shares one compiled program."""
  if region_mask is None:
    region_mask = np.ones((BATCH, 16), bool)
  if title_tokens is None:
    title_tokens = batch["title_tokens"]
  return _apply(mode=mode, method="embed_item")(
      _params(mode), batch["item_image"], title_tokens, batch["title_mask"],
      region_mask)


def test_decode_variant():
  assert vision.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072,
                                               num_heads=12)
  assert vision.decode_variant("L/14")["depth"] == 24
  assert vision.decode_variant("mu")["width"] == 32
  with pytest.raises(ValueError, match="vision_variant='X/16'"):
    vision.decode_variant("X/16")
  assert text.decode_text_variant("B")["width"] == 512
  with pytest.raises(ValueError, match="text_variant"):
    text.decode_text_variant("Ti")


@pytest.mark.parametrize("dtype,mode", [("float32", "tiger"), ("bfloat16", "tiger"),
                                        ("float32", "clip_style")])
def test_tigerfg_outputs(dtype, mode):
  params = _params(mode)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
  batch = _batch(1)
  out = _apply(dtype, mode)(params, batch)
  grid = 32 // 8
  assert out["query_emb"].shape == out["item_emb"].shape == (BATCH, 256)
  assert out["attention"].shape == (BATCH, 2, grid * grid)
  assert out["item_patches"].shape == (BATCH, grid * grid, 32)
  assert out["item_patches"].dtype == jnp.dtype(dtype)
  for key in ("query_emb", "item_emb", "attention", "temperature"):
    assert out[key].dtype == jnp.float32, key
  np.testing.assert_allclose(np.linalg.norm(out["query_emb"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["item_emb"], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["attention"].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["temperature"], 0.07, rtol=1e-6)


def test_methods_match_call_and_bfloat16_computes_the_float32_function():
  params, batch = _params(), _batch(1)
  full = _apply("float32")(params, batch)
  query = jax.eval_shape(_apply(method="embed_query"), params, batch["query_image"])
  assert query.shape == (BATCH, 256) and query.dtype == jnp.float32
  # __call__ passes no region mask; an all-True one is the same pooling.
  item, aux = _embed_item("tiger", batch)
  np.testing.assert_allclose(item, full["item_emb"], atol=1e-6)
  np.testing.assert_allclose(aux["attention"], full["attention"], atol=1e-7)
  half = _apply("bfloat16")(params, batch)
  for key in ("query_emb", "item_emb"):
    cosine = np.sum(np.asarray(full[key]) * np.asarray(half[key]), axis=-1)
    assert np.all(cosine > 0.99), (key, cosine)


def test_submodule_shapes_and_dtypes():
  """Output shapes/dtypes from shapes alone (`jax.eval_shape`: nothing compiled)."""
  def outputs(module, *args):
    return jax.eval_shape(module.init_with_output, jax.random.key(0), *args)[0]

  f32, bf16 = jnp.float32, jnp.bfloat16
  images = jax.ShapeDtypeStruct((BATCH, 16, 24, 3), f32)
  tokens = outputs(vision.VisionEncoder("mu", 8, 4, num_registers=3, dtype=bf16), images)
  assert tokens.shape == (BATCH, 1 + 3 + 2 * 3, 32) and tokens.dtype == bf16
  with pytest.raises(ValueError, match="patch_size=5"):
    outputs(vision.VisionEncoder("mu", 5, 4), images)

  title = jax.ShapeDtypeStruct((BATCH, 6), jnp.int32)
  mask = jax.ShapeDtypeStruct((BATCH, 6), jnp.bool_)
  tokens, pooled = outputs(text.TextEncoder("mu", VOCAB, 8, dtype=bf16), title, mask)
  assert tokens.shape == (BATCH, 6, 32) and pooled.shape == (BATCH, 32)
  assert tokens.dtype == pooled.dtype == bf16
  with pytest.raises(ValueError, match="max_title_len=4"):
    outputs(text.TextEncoder("mu", VOCAB, 4), title, mask)

  for dtype in (f32, bf16):
    patches = jax.ShapeDtypeStruct((BATCH, 10, 32), dtype)
    pooled, attention = outputs(pooling.MAPHead(4, 64, dtype=dtype), patches)
    assert pooled.shape == (BATCH, 32) and pooled.dtype == dtype
    assert attention.shape == (BATCH, 4, 10) and attention.dtype == f32
    cls = jax.ShapeDtypeStruct((BATCH, 32), dtype)
    title_tokens = jax.ShapeDtypeStruct((BATCH, 6, 24), dtype)
    out = outputs(pooling.TextGuidedPooling(3, 2, 64, dtype=dtype), cls, patches,
                  title_tokens, mask)
    assert out["f_a"].shape == out["f_m"].shape == (BATCH, 32)
    assert out["f_a"].dtype == out["f_m"].dtype == dtype
    assert out["slot_weights"].shape == (BATCH, 3)
    assert out["attention"].shape == (BATCH, 2, 10)
    assert out["slot_weights"].dtype == out["attention"].dtype == f32


# ---------------------------------------------- NumPy float64 references ---

def _float64_params(variables) -> dict:
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), variables["params"])


def _random_variables(module: nn.Module, *args, seed: int) -> dict:
  """`module`'s variables, every one random (biases too; LayerNorm scales near 1).

  Shapes come from `jax.eval_shape`: running the initialisers would compile each one.
  """
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))

  def draw(path, leaf):
    offset = 1.0 if path[-1].key == "scale" else 0.0
    return (offset + rng.normal(0.0, 0.2, leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


_NP_ACTIVATIONS = {
    "gelu": lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
    "quick_gelu": lambda x: x / (1 + np.exp(-1.702 * x)),
}


def _np_layer_norm(x, p, eps):
  centred = x - x.mean(-1, keepdims=True)
  normalised = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + eps)
  return normalised * p["scale"] + p["bias"]


def _np_attention(queries, inputs, p, mask):
  """Multi-head attention; mask bool `[B, Q, K]`; a row with no key is uniform."""
  def project(x, name):
    return np.einsum("bkd,dhe->bkhe", x, p[name]["kernel"]) + p[name].get("bias", 0.0)

  q, k, v = project(queries, "query"), project(inputs, "key"), project(inputs, "value")
  logits = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
  allowed = np.broadcast_to(mask[:, None], logits.shape)
  weights = np.exp(logits - logits.max(-1, keepdims=True)) * allowed
  weights = np.where(allowed.any(-1, keepdims=True), weights, 1.0)
  weights /= weights.sum(-1, keepdims=True)
  mixed = np.einsum("bhqk,bkhe->bqhe", weights, v)
  return np.einsum("bqhe,hed->bqd", mixed, p["out"]["kernel"]) + p["out"]["bias"], weights


def _np_encoder(x, p, mask, activation, eps):
  """`transformer.Encoder`: pre-LN blocks, then a LayerNorm."""
  depth = sum(name.startswith("block_") for name in p)
  for i in range(depth):
    block = p[f"block_{i}"]
    y = _np_layer_norm(x, block["norm1"], eps)
    x = x + _np_attention(y, y, block["attn"], mask)[0]
    y = _np_layer_norm(x, block["norm2"], eps)
    hidden = _NP_ACTIVATIONS[activation](
        y @ block["mlp"]["fc1"]["kernel"] + block["mlp"]["fc1"]["bias"])
    x = x + hidden @ block["mlp"]["fc2"]["kernel"] + block["mlp"]["fc2"]["bias"]
  return _np_layer_norm(x, p["norm"], eps)


@pytest.mark.parametrize("per_query", [False, True])
def test_attention_matches_numpy_reference(per_query):
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(2, 3, 8)).astype(np.float32)
  inputs = rng.normal(size=(2, 5, 6)).astype(np.float32)
  keys = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]], bool)
  # Row 1 has no allowed key (uniform); per query, query 0 of row 0 sees key 0 only.
  mask = np.broadcast_to(keys[:, None], (2, 3, 5)).copy()
  mask[0, 0, 1:] = False
  layer = transformer.MultiHeadAttention(num_heads=2)
  variables = _random_variables(layer, queries, inputs, seed=0)
  out, weights = layer.apply(variables, queries, inputs, mask if per_query else keys)
  p = _float64_params(variables)
  assert "bias" not in p["key"]
  want, want_weights = _np_attention(queries, inputs, p,
                                     mask if per_query else keys[:, None])
  np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_mlp_activation_matches_closed_form(activation):
  x = np.linspace(-6, 6, 97, dtype=np.float32)
  got = transformer.ACTIVATIONS[activation](jnp.asarray(x))
  np.testing.assert_allclose(got, _NP_ACTIVATIONS[activation](x.astype(np.float64)),
                             atol=1e-6)


@pytest.mark.parametrize("pre_norm,activation,eps", [(False, "gelu", 1e-6),
                                                     (True, "quick_gelu", 0.3)])
def test_vision_encoder_options_match_numpy_reference(pre_norm, activation, eps):
  patch, registers = 8, 2
  images = np.random.default_rng(2).normal(size=(BATCH, 24, 24, 3)).astype(np.float32)
  encoder = vision.VisionEncoder("mu", patch, 3, registers, pre_norm=pre_norm,
                                 activation=activation, norm_eps=eps)
  variables = _random_variables(encoder, images, seed=1)
  tokens = encoder.apply(variables, images)
  p = _float64_params(variables)
  assert ("pre_norm" in p) == pre_norm

  grid_h, grid_w = 24 // patch, 24 // patch
  patches = images.astype(np.float64).reshape(BATCH, grid_h, patch, grid_w, patch, 3)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(BATCH, grid_h * grid_w, -1)
  kernel = p["patch_embed"]["kernel"].reshape(-1, 32)  # [p * p * 3, D], (y, x, c).
  x = patches @ kernel + p["patch_embed"]["bias"] + p["pos_embedding"]
  prefix = np.concatenate([p["cls"], p["registers"]])
  x = np.concatenate([np.broadcast_to(prefix, (BATCH, *prefix.shape)), x], axis=1)
  if pre_norm:
    x = _np_layer_norm(x, p["pre_norm"], eps)
  everything = np.ones((BATCH, x.shape[1], x.shape[1]), bool)
  want = _np_encoder(x, p["encoder"], everything, activation, eps)
  np.testing.assert_allclose(tokens, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grid,new_grid", [(4, (7, 7)), (6, (3, 3)), (5, (2, 4)), (3, (3, 3))])
def test_resample_posemb_matches_torch_bilinear(grid, new_grid):
  """Bilinear with half-pixel centres, antialiased when shrinking (torch's interpolate)."""
  torch = pytest.importorskip("torch")
  table = np.random.default_rng(grid).normal(size=(grid * grid, 5)).astype(np.float32)
  got = np.asarray(vision.resample_posemb(jnp.asarray(table), grid, new_grid))
  image = torch.from_numpy(table.reshape(1, grid, grid, 5)).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(image.double(), size=new_grid, mode="bilinear",
                                         align_corners=False, antialias=True)
  want = want.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5)
  if (grid, grid) == new_grid:
    np.testing.assert_array_equal(got, table)


@pytest.mark.parametrize("causal,pool,proj_dim,activation,eps", [
    (False, "mean", 0, "gelu", 1e-6),
    (True, "eos", 12, "quick_gelu", 0.3),
    (True, "mean", 0, "gelu", 1e-5),
    (False, "eos", 0, "quick_gelu", 1e-6),
])
def test_text_encoder_options_match_numpy_reference(causal, pool, proj_dim, activation,
                                                    eps):
  length, lengths = 7, np.array([7, 3, 0])
  rng = np.random.default_rng(3)
  mask = np.arange(length)[None, :] < lengths[:, None]
  tokens = np.where(mask, rng.integers(1, VOCAB, mask.shape), 0).astype(np.int32)
  encoder = text.TextEncoder("mu", VOCAB, 8, causal=causal, pool=pool,
                             proj_dim=proj_dim, activation=activation, norm_eps=eps)
  variables = _random_variables(encoder, tokens, mask, seed=2)
  got_tokens, pooled = encoder.apply(variables, tokens, mask)
  p = _float64_params(variables)
  assert ("projection" in p) == bool(proj_dim)

  x = p["token_embed"]["embedding"][tokens] + p["pos_embedding"][:length]
  attend = np.broadcast_to(mask[:, None, :], (3, length, length))
  if causal:
    attend = attend & (np.arange(length)[None, :] <= np.arange(length)[:, None])
  x = _np_encoder(x, p["encoder"], attend, activation, eps)
  if pool == "eos":
    want = np.stack([x[b, n - 1] if n else np.zeros(32) for b, n in enumerate(lengths)])
  else:
    want = np.stack([x[b, :n].mean(0) if n else np.zeros(32)
                     for b, n in enumerate(lengths)])
  if proj_dim:
    want = want @ p["projection"]["kernel"]
  assert pooled.shape == (3, proj_dim or 32)
  # Padded positions' outputs are unused; the real tokens' must match.
  np.testing.assert_allclose(np.asarray(got_tokens)[mask], x[mask], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pooled, want, rtol=1e-4, atol=1e-4)


def _encoders_and_params(config) -> tuple[dict[str, nn.Module], dict]:
  """TigerFG's ViTs and text encoder by name, as called, and its param shapes."""
  encoders = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, (vision.VisionEncoder, text.TextEncoder)):
      encoders[context.module.name] = context.module
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(towers.TigerFG(config).init,
                               {"params": jax.random.key(0)}, _batch())
  return encoders, nn.meta.unbox(variables)["params"]


@pytest.mark.parametrize("clip", [False, True])
def test_model_options_reach_the_encoders(clip):
  """TigerFG hands the config's options to its encoders; the defaults add nothing."""
  options = dict(vision_pre_norm=True, mlp_activation="quick_gelu", norm_eps=1e-5,
                 text_causal=True, text_pool="eos", text_proj_dim=12)
  defaults = dict(vision_pre_norm=False, mlp_activation="gelu", norm_eps=1e-6,
                  text_causal=False, text_pool="mean", text_proj_dim=0)
  assert {k: v for k, v in _model_config().items() if k in defaults} == defaults
  want = options if clip else defaults
  encoders, params = _encoders_and_params(
      _model_config(**want, mode="clip_style", share_vision=False))
  for name in ("vision", "item_vision"):
    vit = encoders[name]
    assert (vit.pre_norm, vit.activation, vit.norm_eps) == (
        want["vision_pre_norm"], want["mlp_activation"], want["norm_eps"])
    assert ("pre_norm" in params[name]) == clip
  title = encoders["text_encoder"]
  assert (title.causal, title.pool, title.proj_dim, title.activation,
          title.norm_eps) == (want["text_causal"], want["text_pool"],
                              want["text_proj_dim"], want["mlp_activation"],
                              want["norm_eps"])
  assert ("projection" in params["item_tower"]["text_encoder"]) == clip
  # clip_style concatenates the MAP-pooled image and the (projected) title.
  assert params["item_tower"]["projection"]["kernel"].shape == (
      32 + (12 if clip else 32), 256)


@pytest.mark.parametrize("mode", ["tiger", "clip_style"])
def test_title_padding_changes_nothing(mode):
  short = _batch(3, title_len=8)
  # The micro preset allows 16 title tokens: pad with 8 more (garbage ids, masked).
  long = dict(short,
              title_tokens=np.concatenate(
                  [short["title_tokens"], np.full((BATCH, 8), 7, np.int32)], 1),
              title_mask=np.concatenate(
                  [short["title_mask"], np.zeros((BATCH, 8), bool)], 1))
  emb_short, aux_short = _apply(mode=mode, method="embed_item")(
      _params(mode), short["item_image"], short["title_tokens"], short["title_mask"])
  emb_long, aux_long = _embed_item(mode, long)
  np.testing.assert_allclose(emb_long, emb_short, atol=1e-5)
  np.testing.assert_allclose(aux_long["attention"], aux_short["attention"], atol=1e-6)


@pytest.mark.parametrize("mode", ["tiger", "clip_style"])
def test_title_guides_pooling_only_in_tiger_mode(mode):
  batch = _batch(4)
  other = np.where(batch["title_mask"], (batch["title_tokens"] + 5) % VOCAB,
                   0).astype(np.int32)
  emb_a, aux_a = _embed_item(mode, batch)
  emb_b, aux_b = _embed_item(mode, batch, title_tokens=other)
  # The title always reaches the embedding; in clip_style it never reaches the map.
  assert np.max(np.abs(emb_a - emb_b)) > 1e-4
  if mode == "clip_style":
    np.testing.assert_array_equal(aux_a["attention"], aux_b["attention"])
  else:
    assert np.max(np.abs(aux_a["attention"] - aux_b["attention"])) > 1e-6


@pytest.mark.parametrize("mode", ["tiger", "clip_style"])
def test_region_mask_is_the_only_teacher_difference(mode):
  batch = _batch(5)
  grid = 4
  free = _apply(mode=mode)(_params(mode), batch)
  everywhere, everywhere_aux = _embed_item(mode, batch,
                                           region_mask=np.ones((BATCH, 16), bool))
  np.testing.assert_allclose(everywhere, free["item_emb"], atol=1e-6)
  np.testing.assert_allclose(everywhere_aux["attention"], free["attention"], atol=1e-7)
  box = np.zeros((BATCH, grid, grid), bool)
  box[0, 1:3, 0:2] = True
  box[1, 2:4, 1:4] = True
  box = box.reshape(BATCH, -1)
  boxed, boxed_aux = _embed_item(mode, batch, region_mask=box)
  attention = np.asarray(boxed_aux["attention"])
  assert np.all(attention[~np.broadcast_to(box[:, None], attention.shape)] == 0)
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
  assert np.max(np.abs(boxed - free["item_emb"])) > 1e-4
  # An empty box gives uniform attention instead of NaN.
  _, empty_aux = _embed_item(mode, batch, region_mask=np.zeros((BATCH, 16), bool))
  np.testing.assert_allclose(empty_aux["attention"], 1 / grid**2, rtol=1e-6)


@pytest.mark.parametrize("share_vision", [True, False])
def test_query_and_item_images_of_different_sizes(share_vision):
  """Position embeddings live on the posemb_grid; both towers accept other grids."""
  config = _model_config(query_pool="map", share_vision=share_vision, posemb_grid=3)
  model = towers.TigerFG(config)
  batch = _batch(6)
  batch["query_image"] = batch["query_image"][:, :16, :16]
  variables = model.init({"params": jax.random.key(0)}, batch)
  params = nn.meta.unbox(variables)["params"]
  assert "map_head" in params["query_tower"]
  assert ("item_vision" in params) == (not share_vision)
  for tower in ("vision", "item_vision") if not share_vision else ("vision",):
    assert params[tower]["pos_embedding"].shape == (9, 32)
  out = model.apply(nn.meta.unbox(variables), batch)
  assert out["query_emb"].shape == (BATCH, 256)
  assert out["attention"].shape == (BATCH, config.pooling_heads, 16)
  # The query's 2 x 2 grid reads the resampled 3 x 3 table: moving the table moves it.
  shifted = jax.tree.map(lambda x: x, nn.meta.unbox(variables))
  shifted["params"]["vision"]["pos_embedding"] += jax.random.normal(jax.random.key(1),
                                                                    (9, 32))
  moved = model.apply(shifted, batch)["query_emb"]
  assert np.max(np.abs(np.asarray(moved) - np.asarray(out["query_emb"]))) > 1e-3


def test_config_errors_are_clear():
  batch = _batch()
  for overrides, match in [(dict(vocab_size=0), "vocab_size=0"),
                           (dict(mode="global"), "model.mode='global'"),
                           (dict(dtype="float16"), "model.dtype='float16'"),
                           (dict(query_pool="mean"), "query_pool='mean'"),
                           (dict(mlp_activation="relu"), "mlp_activation='relu'"),
                           (dict(text_pool="cls"), "text_pool='cls'"),
                           (dict(posemb_grid=0), "posemb_grid=0")]:
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(towers.TigerFG(_model_config(**overrides)).init,
                     {"params": jax.random.key(0)}, batch)


def test_temperature_is_clipped():
  params = _params()
  for log_t, want in [(np.log(1e-4), 0.01), (np.log(0.2), 0.2), (np.log(5.0), 1.0)]:
    params["params"]["log_temperature"] = jnp.float32(log_t)
    got = _apply(method="temperature")(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_every_parameter_has_logical_axes_and_rules_map_them():
  variables = _boxed_variables("tiger")
  specs = nn.get_partition_spec(variables)
  flat = jax.tree_util.tree_leaves_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  boxed = jax.tree_util.tree_leaves(
      variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in boxed)
  assert len(flat) == len(boxed)
  for _, spec in flat:
    assert set(spec) <= set(partitioning.AXIS_NAMES) | {None}
  fc1 = specs["params"]["vision"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
  query = specs["params"]["vision"]["encoder"]["block_0"]["attn"]["query"]["kernel"]
  expected = {"replicated": ((None, None), (None, None, None)),
              "fsdp": (("data", None), ("data", None, None)),
              "tensor": ((None, "model"), (None, "model", None))}
  for name, (want_fc1, want_query) in expected.items():
    rules = partitioning.logical_axis_rules(name)
    assert tuple(nn.logical_to_mesh_axes(fc1, rules)) == want_fc1
    assert tuple(nn.logical_to_mesh_axes(query, rules)) == want_query
    # Every parameter maps without a conflict.
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    nn.logical_to_mesh_sharding(specs, mesh, rules)
  with pytest.raises(ValueError, match="param_sharding='zero'"):
    partitioning.logical_axis_rules("zero")
