"""The text-query item fusions and the text query tower (models/fusion.py, towers.py):
shapes and norms, title padding, Beyond Text's fusion against a float64 NumPy
reference from the module's own parameters, SMAR's gate, sharing of the title encoder,
and the unchanged parameter tree of the default model."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests import train_helpers
from tigerfg_jax.models import factory

FUSIONS = ("tiger", "concat", "text", "image", "beyond_text", "smar")


def _model(fusion, encoder="own", **overrides):
  config = train_helpers.micro_config("text_query", **{
      "model.item_fusion": fusion, "model.text_query_encoder": encoder, **overrides})
  model = factory.build_model(config, train_helpers.VOCAB_SIZE)
  batch = train_helpers.random_batch(config, 4, seed=0)
  rng = np.random.default_rng(1)
  lq = config.model.max_query_len
  mask = np.arange(lq)[None, :] < rng.integers(3, lq + 1, 4)[:, None]
  batch.update(text_tokens=np.where(mask, rng.integers(4, train_helpers.VOCAB_SIZE, (4, lq)),
                                    0).astype(np.int32), text_mask=mask)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                    factory.dummy_batch(config, 2)))["params"]
  return config, model, jax.device_get(params), batch


@pytest.mark.parametrize("fusion", FUSIONS)
def test_shapes_and_unit_norms(fusion):
  config, model, params, batch = _model(fusion)
  out = model.apply({"params": params}, batch)
  e = config.model.embed_dim
  width = 2 * e if fusion == "smar" else e
  assert out["item_emb"].shape == out["text_query_emb"].shape == (4, width)
  np.testing.assert_allclose(np.linalg.norm(out["text_query_unit"], axis=-1), 1, atol=1e-5)
  halves = np.split(np.asarray(out["item_emb"]), width // e, axis=-1)
  for half in halves:  # smar: [multimodal, text], each of unit norm.
    np.testing.assert_allclose(np.linalg.norm(half, axis=-1), 1, atol=1e-5)
  has_modalities = fusion in ("beyond_text", "smar")
  assert ("item_text_emb" in out) == ("item_image_emb" in out) == has_modalities
  assert ("item_mm_emb" in out) == (fusion == "smar")


@pytest.mark.parametrize("fusion", ["text", "beyond_text", "smar", "tiger"])
def test_title_padding_changes_nothing(fusion):
  _, model, params, batch = _model(fusion)
  other = dict(batch, title_tokens=np.where(batch["title_mask"], batch["title_tokens"], 7))
  first = model.apply({"params": params}, batch)
  second = model.apply({"params": params}, other)
  np.testing.assert_allclose(first["item_emb"], second["item_emb"], atol=1e-6)
  if fusion == "beyond_text":  # the fusion query gives padded title tokens no weight.
    length = batch["title_mask"].shape[1]
    weights = np.asarray(first["fusion_attention"])[:, :, :length]
    assert np.all(weights[~np.broadcast_to(batch["title_mask"][:, None], weights.shape)] == 0)


def _layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def test_beyond_text_fusion_matches_numpy_reference():
  _, model, params, batch = _model("beyond_text")
  out, state = model.apply({"params": params}, batch, capture_intermediates=True)
  inter = state["intermediates"]
  p = _f64(params["item_tower"])
  # Inputs of the fusion, as the module computed them: the ViT's patches (its first
  # call is the item tower's; the query tower's comes after) and the title states
  # mapped to the ViT width.
  registers = train_helpers.micro_config("text_query").model.num_registers
  patches = np.asarray(inter["vision"]["__call__"][0], np.float64)[:, 1 + registers:]
  title = np.asarray(inter["item_tower"]["title_to_image_width"]["__call__"][0], np.float64)
  keys = np.concatenate([title + p["modality_embed"][0], patches + p["modality_embed"][1]], 1)
  mask = np.concatenate([batch["title_mask"], np.ones(patches.shape[:2], bool)], 1)
  attn = p["fusion_attn"]
  heads, head_dim = attn["query"]["kernel"].shape[1:]
  q = (np.einsum("d,dhk->hk", p["fusion_query"][0], attn["query"]["kernel"])
       + attn["query"]["bias"]) / math.sqrt(head_dim)
  k = np.einsum("bnd,dhk->bnhk", keys, attn["key"]["kernel"])
  v = np.einsum("bnd,dhk->bnhk", keys, attn["value"]["kernel"]) + attn["value"]["bias"]
  logits = np.where(mask[:, None, :], np.einsum("hk,bnhk->bhn", q, k), -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(out["fusion_attention"], weights, atol=1e-5)
  mixed = np.einsum("bhn,bnhk->bhk", weights, v)
  fused = np.einsum("bhk,hkd->bd", mixed, attn["out"]["kernel"]) + attn["out"]["bias"]
  mlp = p["fusion_mlp"]
  hidden = _gelu(_layer_norm(fused, p["fusion_norm"]) @ mlp["fc1"]["kernel"]
                 + mlp["fc1"]["bias"])
  fused = fused + hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
  emb = fused @ p["fusion_projection"]["kernel"] + p["fusion_projection"]["bias"]
  emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
  np.testing.assert_allclose(out["item_emb"], emb, atol=1e-5)
  assert heads == train_helpers.micro_config("text_query").model.pooling_heads


def test_smar_gate_is_a_per_query_mix_of_multimodal_and_text_scores():
  _, model, params, batch = _model("smar")
  out = model.apply({"params": params}, batch)
  q = np.asarray(out["text_query_unit"], np.float64)
  gate = params["text_query_gate"]
  a = 1 / (1 + np.exp(-(q @ np.asarray(gate["kernel"], np.float64) + gate["bias"])))
  mm, text = (np.asarray(out[k], np.float64) for k in ("item_mm_emb", "item_text_emb"))
  expected = a * (q @ mm.T) + (1 - a) * (q @ text.T)
  searched = np.asarray(out["text_query_emb"], np.float64) @ np.asarray(
      out["item_emb"], np.float64).T
  np.testing.assert_allclose(searched, expected, atol=1e-5)
  assert np.all((a > 0) & (a < 1))


@pytest.mark.parametrize("fusion", [f for f in FUSIONS if f != "image"])
def test_title_encoder_is_shared_with_text_query_encoder_title(fusion):
  config, model, params, batch = _model(fusion, encoder="title")
  assert "text_query_encoder" not in params and "text_query_projection" in params
  embed = lambda p: model.apply({"params": p}, batch["text_tokens"], batch["text_mask"],
                                method=type(model).embed_text_query)
  moved = jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.1 if "text_encoder" in jax.tree_util.keystr(path) else a, params)
  assert not np.allclose(embed(params), embed(moved), atol=1e-4)
  assert config.model.max_query_len <= config.model.max_title_len


_FUSION_TREES = {
    "text": {"text_encoder", "text_projection"},
    "image": {"image_pool", "image_projection"},
    "smar": {"text_encoder", "text_projection", "image_pool", "image_projection",
             "title_to_image_width", "fusion_attn", "fusion_norm", "fusion_mlp",
             "fusion_projection"},
}
_FUSION_TREES["beyond_text"] = _FUSION_TREES["smar"] | {"modality_embed", "fusion_query"}


@pytest.mark.parametrize("fusion", sorted(_FUSION_TREES))
def test_fusion_item_tower_trees_keep_their_names(fusion):
  # Checkpoints of text_query runs and the copy from the teacher rely on these names.
  _, _, params, _ = _model(fusion)
  assert set(params["item_tower"]) == _FUSION_TREES[fusion]


def test_default_model_tree_is_unchanged():
  config = train_helpers.micro_config("distill")
  model = factory.build_model(config, train_helpers.VOCAB_SIZE)
  params = factory.abstract_variables(model, config)["params"]
  # The tree docs/ARCHITECTURE.md and the converters rely on.
  assert set(params) == {"vision", "query_tower", "item_tower", "log_temperature"}
  assert set(params["item_tower"]) == {
      "text_encoder", "pooling", "merge_norm", "merge_mlp", "projection",
      "region_projection", "title_projection"}
