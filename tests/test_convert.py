"""CLIP weight import: a tiny random `transformers.CLIPModel` built here (nothing is
downloaded) is converted, and our encoders must compute its image and text features.

The conversion uses the model options that make our encoders compute what CLIP
computes (`config.model.vision_pre_norm`, `mlp_activation`, `norm_eps`, `text_causal`,
`text_pool`, `text_proj_dim`; see `tigerfg_jax/convert.py`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tigerfg_jax import config_lib
from tigerfg_jax import sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.convert import clip as convert_clip
from tigerfg_jax.convert import clip_layout
from tigerfg_jax.data import synthetic
from tigerfg_jax.models import text, towers
from tigerfg_jax.training import trainer

torch = pytest.importorskip(
    "torch", reason="the converter tests need torch (requirements-test.txt)")
transformers = pytest.importorskip(
    "transformers", reason="the converter tests need transformers (requirements-test.txt)")
pytest.importorskip("safetensors", reason="the converter tests need safetensors")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTION = 24
# The plain vocabulary given as config.data.tokenizer: [BOS]=1, [EOS]=3 as in the
# CLIP config below (an eos id other than 2, so transformers pools at the EOS token).
VOCAB = ["[PAD]", "[BOS]", "[UNK]", "[EOS]", *[f"w{i}" for i in range(36)]]
CLIP_OPTIONS = dict(vision_pre_norm=True, mlp_activation="quick_gelu", norm_eps=1e-5,
                    text_causal=True, text_pool="eos", text_proj_dim=PROJECTION)


def tiny_clip(vision_width: int = 32, seed: int = 0):
  """A `CLIPModel` the size of the `micro` preset, every weight random (norms too, and
  the attention key biases the converter drops, so that dropping them is tested)."""
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2,
                       max_position_embeddings=20, pad_token_id=0, bos_token_id=1,
                       eos_token_id=3),
      vision_config=dict(hidden_size=vision_width, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, image_size=32,
                         patch_size=8),
      projection_dim=PROJECTION)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name == "logit_scale":
        continue
      param.normal_(0.0, 0.2)
      if "norm" in name and name.endswith("weight"):
        param.add_(1.0)
  return model


def micro_config(tokenizer: str, **model_overrides):
  """`clip_style` at `micro` (ViT and text 'mu', 32x32 images, patch 8, no registers)."""
  config = config_lib.experiment_config("clip_style", "micro")
  config.model.embed_dim = PROJECTION
  config.data.tokenizer = tokenizer
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  """(torch model, its save_pretrained folder, the matching vocabulary file)."""
  root = tmp_path_factory.mktemp("clip")
  model = tiny_clip()
  model.save_pretrained(root / "hf")
  with open(root / "vocab.txt", "w") as f:
    f.write("\n".join(VOCAB) + "\n")
  return model, str(root / "hf"), str(root / "vocab.txt")


@pytest.fixture(scope="module")
def converted(clip, tmp_path_factory):
  """(report, what convert printed, workdir, config, model, params read back).

  The params are read back the way a distillation run reads its teacher's workdir.
  """
  _, folder, vocab = clip
  out = str(tmp_path_factory.mktemp("converted") / "workdir")
  config = micro_config(vocab, **CLIP_OPTIONS)
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    report = convert_clip.convert(folder, config, out)
  mesh = sharding.make_mesh(config.mesh)
  model, params = workdir_lib.load_run(out, mesh, len(VOCAB))
  return report, printed.getvalue(), out, config, model, params


def _flat(params) -> dict[str, np.ndarray]:
  return {name: np.asarray(leaf) for name, leaf in convert_clip.flat_params(params).items()}


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_image_features_match_transformers(clip, converted):
  torch_model, _, _ = clip
  _, _, _, config, model, params = converted
  images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8)
  mean, std = np.asarray(config.model.pixel_mean), np.asarray(config.model.pixel_std)
  pixels = ((images - mean) / std).astype(np.float32)
  with torch.no_grad():
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
    cls_ref = torch_model.vision_model(pixel_values=torch_pixels).pooler_output.numpy()
    features_ref = torch_model.get_image_features(
        pixel_values=torch_pixels).pooler_output.numpy()

  variables = {"params": params}
  tokens = model.apply(variables, pixels, method=lambda m, x: m.vision(x))
  np.testing.assert_allclose(tokens[:, 0], cls_ref, atol=1e-4)
  query = model.apply(variables, images, method=towers.TigerFG.embed_query)
  np.testing.assert_allclose(query, _unit(features_ref), atol=1e-4)


def test_text_features_match_transformers(clip, converted):
  torch_model, _, _ = clip
  _, _, _, config, _, params = converted
  rng = np.random.default_rng(1)
  length = config.model.max_title_len
  lengths = np.array([length, 5, 9])
  mask = np.arange(length)[None, :] < lengths[:, None]
  tokens = np.where(mask, rng.integers(4, len(VOCAB), (3, length)), 0)
  tokens[:, 0] = 1
  tokens[np.arange(3), lengths - 1] = 3
  with torch.no_grad():
    features_ref = torch_model.get_text_features(
        input_ids=torch.from_numpy(tokens), attention_mask=torch.from_numpy(mask.astype(np.int64))
    ).pooler_output.numpy()

  # The item tower's title encoder, standalone, with the converted config's options.
  encoder = text.TextEncoder(
      config.model.text_variant, len(VOCAB), length, causal=CLIP_OPTIONS["text_causal"],
      pool=CLIP_OPTIONS["text_pool"], proj_dim=CLIP_OPTIONS["text_proj_dim"],
      activation=CLIP_OPTIONS["mlp_activation"], norm_eps=CLIP_OPTIONS["norm_eps"])
  _, pooled = encoder.apply({"params": params["item_tower"]["text_encoder"]},
                            tokens.astype(np.int32), mask)
  np.testing.assert_allclose(pooled, features_ref, atol=1e-4)


def test_report_accounts_for_every_parameter(converted):
  report, printed, out, _, _, params = converted
  with open(os.path.join(out, convert_clip.REPORT_FILE)) as f:
    assert json.load(f) == report
  every = set(_flat(params))
  loaded, zeros, new = set(report["loaded"]), set(report["zero_filled"]), set(
      report["newly_initialised"])
  assert loaded | zeros | new == every
  assert not (loaded & zeros or loaded & new or zeros & new)
  assert zeros == {"vision/patch_embed/bias", "query_tower/projection/bias"}
  assert report["loaded"]["vision/pre_norm/scale"] == ["vision_model.pre_layrnorm.weight"]
  assert report["loaded"]["vision/cls"] == [
      "vision_model.embeddings.class_embedding",
      "vision_model.embeddings.position_embedding.weight"]
  assert {"log_temperature", "item_tower/projection/kernel"} <= new
  assert all(p in new for p in every if p.startswith("item_tower/pooling/"))
  assert report["unused_checkpoint_tensors"] == ["logit_scale"]
  assert report["dropped_no_effect"] == sorted(
      f"{tower}.encoder.layers.{i}.self_attn.k_proj.bias"
      for tower in ("vision_model", "text_model") for i in range(2))
  assert report["vocab_size"] == len(VOCAB)
  assert os.path.exists(os.path.join(out, workdir_lib.TOKENIZER_FILE))
  pooling = sum(p.startswith("item_tower/pooling/") for p in new)
  assert f"newly initialised:  {len(new)} arrays" in printed
  assert f"item_tower/pooling ({pooling} arrays)" in printed
  assert "log_temperature (1 arrays)" in printed
  assert "dropped, no effect: 4 attention key biases" in printed


def test_a_run_on_the_converted_workdir_starts_from_the_imported_params(converted,
                                                                        tmp_path):
  _, _, converted_dir, config, _, params = converted
  out = str(tmp_path / "run")
  shutil.copytree(converted_dir, out)
  assert workdir_lib.has_init_params(out)
  assert workdir_lib.checkpoint_manager(out).latest_step() is None
  run_config = config.copy_and_resolve_references()
  synthetic.write_catalog(str(tmp_path / "data"), seed=0, items=16, image_size=32)
  run_config.data.root = str(tmp_path / "data")
  run_config.train.learning_rate = 0.0  # the step leaves every parameter as it was.
  assert trainer.train_and_evaluate(run_config, out, stop_after=1) is None
  built = trainer.make_trainer(run_config, sharding.make_mesh(config.mesh), len(VOCAB))
  state, _ = workdir_lib.restore_checkpoint(workdir_lib.checkpoint_manager(out), 1,
                                            built.abstract_state)
  before, after = _flat(params), _flat(state.params)
  assert before.keys() == after.keys()
  for name, value in before.items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_pickled_checkpoint_is_refused_without_allow_pickle(clip, tmp_path):
  torch_model, folder, vocab = clip
  pickled = str(tmp_path / "pytorch_model.bin")
  torch.save(torch_model.state_dict(), pickled)
  with pytest.raises(convert_clip.ConversionError, match="--allow_pickle"):
    convert_clip.convert(pickled, micro_config(vocab), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")

  from_pickle = convert_clip.read_state_dict(pickled, allow_pickle=True)
  from_safetensors = convert_clip.read_state_dict(os.path.join(folder, "model.safetensors"))
  assert from_pickle.keys() == from_safetensors.keys()
  for name, value in from_safetensors.items():
    np.testing.assert_array_equal(from_pickle[name], value, err_msg=name)


def test_cli_refuses_a_pickle_with_a_clear_message(clip, tmp_path):
  torch_model, _, vocab = clip
  pickled = str(tmp_path / "clip.pt")
  torch.save(torch_model.state_dict(), pickled)
  result = subprocess.run(
      [sys.executable, "-m", "tigerfg_jax.convert", f"--checkpoint={pickled}",
       f"--config={REPO}/configs/clip_style.py:micro", f"--out={tmp_path / 'out'}",
       f"--config.data.tokenizer={vocab}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "--allow_pickle" in result.stderr and "Traceback" not in result.stderr


def test_other_shapes_name_the_parameter_and_both_shapes(clip, tmp_path):
  _, _, vocab = clip
  tiny_clip(vision_width=48).save_pretrained(tmp_path / "wide")
  with pytest.raises(convert_clip.ConversionError) as error:
    convert_clip.convert(str(tmp_path / "wide"), micro_config(vocab, **CLIP_OPTIONS),
                    str(tmp_path / "out"))
  message = str(error.value)
  assert ("vision/encoder/block_0/attn/query/kernel <- "
          "vision_model.encoder.layers.0.self_attn.q_proj.weight") in message
  assert "checkpoint gives (48, 48), model has (32, 2, 16)" in message
  assert "vision/patch_embed/kernel" in message and "(8, 8, 3, 48)" in message


def test_model_that_differs_from_clip_gets_the_overrides_to_use(clip):
  torch_model, _, _ = clip
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  facts = convert_clip.CheckpointFacts("quick_gelu", 1e-5, 2, 2)
  required = convert_clip.required_model_options(state, facts)
  assert required == {"norm_eps": 1e-5, "vision_pre_norm": True, "text_causal": True,
                      "text_pool": "eos", "mlp_activation": "quick_gelu"}
  model_config = config_lib.experiment_config("clip_style", "micro").model
  with pytest.raises(convert_clip.ConversionError) as error:
    convert_clip.check_model_options(model_config, required)
  message = str(error.value)
  for key, value in required.items():
    assert f"--config.model.{key}={value}" in message


def test_open_clip_layout_maps_onto_the_huggingface_names(clip):
  torch_model, _, _ = clip
  hf = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  open_clip = _open_clip_state(hf)
  layout, renamed = clip_layout.to_huggingface(open_clip, "open_clip test dict")
  assert layout == clip_layout.OPEN_CLIP
  assert renamed.keys() == hf.keys()
  for name, value in hf.items():
    np.testing.assert_array_equal(renamed[name], value, err_msg=name)


def _open_clip_state(hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """open_clip's names for a Hugging Face CLIP state dict (written from open_clip's
  module layout: fused in_proj, `x @ proj` projections, ln_1/ln_2, c_fc/c_proj)."""
  state = {
      "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
      "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
      "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
      "visual.proj": hf["visual_projection.weight"].T,
      "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
      "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
      "text_projection": hf["text_projection.weight"].T,
      "logit_scale": hf["logit_scale"],
  }
  norms = {"visual.ln_pre": "vision_model.pre_layrnorm",
           "visual.ln_post": "vision_model.post_layernorm",
           "ln_final": "text_model.final_layer_norm"}
  for tower, prefix in (("vision_model", "visual."), ("text_model", "")):
    for i in range(2):
      theirs, ours = f"{prefix}transformer.resblocks.{i}", f"{tower}.encoder.layers.{i}"
      norms.update({f"{theirs}.ln_1": f"{ours}.layer_norm1",
                    f"{theirs}.ln_2": f"{ours}.layer_norm2",
                    f"{theirs}.attn.out_proj": f"{ours}.self_attn.out_proj",
                    f"{theirs}.mlp.c_fc": f"{ours}.mlp.fc1",
                    f"{theirs}.mlp.c_proj": f"{ours}.mlp.fc2"})
      for kind in ("weight", "bias"):
        state[f"{theirs}.attn.in_proj_{kind}"] = np.concatenate(
            [hf[f"{ours}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
  for theirs, ours in norms.items():
    for kind in ("weight", "bias"):
      state[f"{theirs}.{kind}"] = hf[f"{ours}.{kind}"]
  return state
