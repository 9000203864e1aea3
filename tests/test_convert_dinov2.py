"""DINOv2 patch teacher: a tiny random `transformers.Dinov2Model` built here (nothing is
downloaded) is converted, and `models.patch_teacher` must give its tokens, at its own
grid and, on resized images, at other grids (transformers resamples the position table
itself; the image resize and normalisation of the reference are done in torch/NumPy).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import train_helpers
from tests.test_losses import spatial_relation_reference
from tigerfg_jax.convert import clip_layout
from tigerfg_jax.convert import dinov2 as convert_dinov2
from tigerfg_jax.models import factory, patch_teacher, vision
from tigerfg_jax.training import step as step_lib

torch = pytest.importorskip(
    "torch", reason="the converter tests need torch (requirements-test.txt)")
transformers = pytest.importorskip(
    "transformers", reason="the converter tests need transformers (requirements-test.txt)")
pytest.importorskip("safetensors", reason="the converter tests need safetensors")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH, IMAGE = 4, 16  # A 4 x 4 native grid.
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def tiny_dinov2(registers: int = 0, seed: int = 0):
  """A random DINOv2 ViT (width 32, 2 blocks, 2 heads): every weight random, the layer
  scales, biases and mask token too, so that each mapping and each drop is tested."""
  torch.manual_seed(seed)
  sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
               patch_size=PATCH, image_size=IMAGE)
  if registers:
    model = transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **sizes))
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**sizes))
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.normal_(0.0, 0.2)
      if "norm" in name and name.endswith("weight") or "lambda1" in name:
        param.add_(1.0)
  return model.eval()


def convert_quietly(folder, out, **kwargs):
  with contextlib.redirect_stdout(io.StringIO()):
    return convert_dinov2.convert(str(folder), str(out), **kwargs)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
  """(torch model, its save_pretrained folder, report, loaded teacher, teacher folder)."""
  root = tmp_path_factory.mktemp("dinov2")
  model = tiny_dinov2()
  model.save_pretrained(root / "hf")
  report = convert_quietly(root / "hf", root / "teacher")
  teacher = str(root / "teacher")
  return model, str(root / "hf"), report, patch_teacher.load_patch_teacher(teacher), teacher


def hf_tokens(model, pixels: np.ndarray) -> np.ndarray:
  """transformers' last_hidden_state for normalised `[B, S, S, 3]` pixels."""
  with torch.no_grad():
    inputs = torch.from_numpy(pixels.astype(np.float32).transpose(0, 3, 1, 2))
    return model(pixel_values=inputs).last_hidden_state.numpy()


def reference_pixels(images: np.ndarray, size: int) -> np.ndarray:
  """Independent of `patch_tokens`: torch's antialiased bicubic resize (PIL's kernel),
  clipped to the pixel range, then ImageNet normalisation in NumPy."""
  pixels = torch.from_numpy(images.astype(np.float32).transpose(0, 3, 1, 2))
  if images.shape[1] != size:
    pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bicubic",
                                             align_corners=False, antialias=True)
  pixels = pixels.clamp(0, 255).numpy().transpose(0, 2, 3, 1).astype(np.float64)
  return (pixels / 255.0 - MEAN) / STD


def random_images(size: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (2, size, size, 3), dtype=np.uint8)


def test_every_token_matches_transformers_at_the_native_grid(dinov2):
  model, _, _, teacher, _ = dinov2
  pixels = reference_pixels(random_images(IMAGE), IMAGE)
  ours = teacher.module.apply({"params": teacher.params}, jnp.asarray(pixels, jnp.float32))
  theirs = hf_tokens(model, pixels)
  assert ours.shape == theirs.shape == (2, 1 + (IMAGE // PATCH) ** 2, 32)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("image_size, grid", [(IMAGE, 4), (20, 6), (20, 3), (8, 5)])
def test_patch_tokens_match_transformers_on_the_resized_image(dinov2, image_size, grid):
  model, _, _, teacher, _ = dinov2
  images = random_images(image_size, seed=grid)
  ours = jax.jit(patch_teacher.patch_tokens, static_argnums=2)(
      teacher, jnp.asarray(images), grid)
  theirs = hf_tokens(model, reference_pixels(images, grid * PATCH))[:, 1:]
  assert ours.dtype == jnp.float32 and ours.shape == (2, grid * grid, 32)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_torch_bicubic_matrix_is_torch_interpolate():
  for size_in, size_out in ((4, 7), (37, 8), (5, 5), (6, 2)):
    signal = np.random.default_rng(size_out).normal(size=size_in)
    resized = torch.nn.functional.interpolate(  # One row: the height stays 1.
        torch.tensor(signal)[None, None, None], size=(1, size_out), mode="bicubic",
        align_corners=False)
    np.testing.assert_allclose(patch_teacher.torch_bicubic_matrix(size_in, size_out) @ signal,
                               resized[0, 0, 0].numpy(), atol=1e-12)


def test_registers_model_matches_at_another_grid(tmp_path):
  model = tiny_dinov2(registers=3)
  model.save_pretrained(tmp_path / "hf")
  report = convert_quietly(tmp_path / "hf", tmp_path / "teacher", probe=False)
  assert report["loaded"]["registers"] == ["embeddings.register_tokens"]
  teacher = patch_teacher.load_patch_teacher(str(tmp_path / "teacher"))
  assert teacher.spec.num_registers == 3
  for grid in (3, 6):
    images = random_images(20, seed=grid)
    ours = patch_teacher.patch_tokens(teacher, jnp.asarray(images), grid)
    theirs = hf_tokens(model, reference_pixels(images, grid * PATCH))[:, 1 + 3:]
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=0)


def test_report_maps_every_tensor_and_drops_the_mask_token(dinov2):
  _, _, report, teacher, _ = dinov2
  assert "embeddings.mask_token" in report["dropped"]
  assert sorted(n for n in report["dropped"] if n.endswith("key.bias")) == [
      f"encoder.layer.{i}.attention.attention.key.bias" for i in range(2)]
  assert report["unused_checkpoint_tensors"] == [] and report["zero_filled"] == []
  ours = set(convert_dinov2.clip.flat_params(teacher.params))
  assert set(report["loaded"]) == ours
  assert report["loaded"]["encoder/block_1/ls2"] == ["encoder.layer.1.layer_scale2.lambda1"]
  assert report["loaded"]["cls"] == ["embeddings.cls_token", "embeddings.position_embeddings"]
  probe = report["probe"]
  assert probe["native_grid"] == 4 and probe["probe_grid"] == 2
  assert probe["max_abs_diff_native_all_tokens"] < 1e-4
  assert probe["max_abs_diff_probe_grid_patch_tokens"] < 1e-4
  spec = report["spec"]
  assert (spec["width"], spec["depth"], spec["mlp_dim"], spec["num_heads"]) == (32, 2, 64, 2)
  assert list(spec["pixel_mean"]) == list(MEAN) and list(spec["pixel_std"]) == list(STD)
  assert spec["norm_eps"] == 1e-6 and spec["posemb_grid"] == 4


def test_layer_scale_is_off_by_default_so_existing_trees_are_unchanged():
  images = jnp.zeros((1, 16, 16, 3))
  plain, scaled = (nn.meta.unbox(vision.VisionEncoder("mu", 8, 2, layer_scale=scale).init(
      jax.random.PRNGKey(0), images)) for scale in (None, 0.1))
  plain_names = set(convert_dinov2.clip.flat_params(plain))
  added = set(convert_dinov2.clip.flat_params(scaled)) - plain_names
  assert not any("/ls" in name for name in plain_names)
  assert added == {f"params/encoder/block_{i}/ls{k}" for i in range(2) for k in (1, 2)}
  assert np.allclose(scaled["params"]["encoder"]["block_0"]["ls1"], 0.1)


def test_a_clip_folder_is_refused_naming_config_json(tmp_path):
  config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=16, patch_size=4)
  transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
  with pytest.raises(clip_layout.ConversionError,
                     match=r"config\.json: model_type='clip_vision_model'"):
    convert_quietly(tmp_path / "clip", tmp_path / "out")
  assert not os.path.exists(tmp_path / "out")


def test_missing_weights_or_tensors_are_named(dinov2, tmp_path):
  _, folder, _, _, _ = dinov2
  no_weights = tmp_path / "no_weights"
  no_weights.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), no_weights)
  with pytest.raises(clip_layout.ConversionError, match="expected one weights file"):
    convert_quietly(no_weights, tmp_path / "out")

  from safetensors import numpy as safetensors_numpy
  state = safetensors_numpy.load_file(os.path.join(folder, "model.safetensors"))
  del state["encoder.layer.1.mlp.fc2.bias"]
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(os.path.join(folder, "config.json"), partial)
  safetensors_numpy.save_file(state, str(partial / "model.safetensors"))
  with pytest.raises(clip_layout.ConversionError,
                     match=r"encoder\.layer\.1\.mlp\.fc2\.bias: missing"):
    convert_quietly(partial, tmp_path / "out")


def test_load_patch_teacher_names_the_missing_or_odd_file(dinov2, tmp_path):
  with pytest.raises(FileNotFoundError, match="no such folder"):
    patch_teacher.load_patch_teacher(str(tmp_path / "absent"))
  _, _, report, _, _ = dinov2
  folder = tmp_path / "teacher"
  folder.mkdir()
  with pytest.raises(FileNotFoundError, match=r"patch_teacher\.json \(the spec\)"):
    patch_teacher.load_patch_teacher(str(folder))
  spec = dict(report["spec"])
  del spec["patch_size"]
  (folder / "patch_teacher.json").write_text(json.dumps(spec))
  with pytest.raises(FileNotFoundError, match=r"params \(the params"):
    patch_teacher.load_patch_teacher(str(folder))
  (folder / "params").mkdir()
  with pytest.raises(ValueError, match=r"patch_teacher\.json: missing keys \['patch_size'\]"):
    patch_teacher.load_patch_teacher(str(folder))


def test_params_that_do_not_fit_the_spec_are_named(dinov2, tmp_path):
  _, _, _, _, folder = dinov2
  copy = tmp_path / "teacher"
  shutil.copytree(folder, copy)
  spec = json.loads((copy / "patch_teacher.json").read_text())
  spec["depth"] = 3
  (copy / "patch_teacher.json").write_text(json.dumps(spec))
  with pytest.raises(ValueError, match=r"encoder/block_2/norm1/scale: stored nothing"):
    patch_teacher.load_patch_teacher(str(copy))


def test_cli_writes_a_patch_teacher(dinov2, tmp_path):
  _, folder, _, teacher, _ = dinov2
  result = subprocess.run(
      [sys.executable, "-m", "tigerfg_jax.convert", "--format=dinov2",
       f"--checkpoint={folder}", f"--out={tmp_path / 'out'}", "--noprobe"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "embeddings.mask_token" in result.stdout
  again = patch_teacher.load_patch_teacher(str(tmp_path / "out"))
  assert again.spec == teacher.spec
  for name, value in convert_dinov2.clip.flat_params(teacher.params).items():
    np.testing.assert_array_equal(convert_dinov2.clip.flat_params(again.params)[name],
                                  value, err_msg=name)


def test_the_distill_loss_takes_srd_from_the_patch_teacher(dinov2):
  """L_SRD with a converted patch teacher: the student's patch relations inside the
  box against the teacher's tokens of the same item images, as the float64 reference
  computes them; the stage-1 teacher is not needed for it."""
  teacher = dinov2[3]
  config = train_helpers.micro_config(**{**train_helpers.NO_TEACHER, "loss.w_srd": 1.0})
  model = factory.build_model(config, train_helpers.VOCAB_SIZE)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0),
                                    factory.dummy_batch(config, 2)))["params"]
  batch = {k: jnp.asarray(v) for k, v in train_helpers.random_batch(config, 6, 0).items()}
  grid = config.data.item_image_size // config.model.patch_size
  assert not step_lib.teacher_views(config.loss, has_patch_teacher=True)["full"]
  loss_fn = step_lib.make_loss_fn(model, None, "distill", config.loss, patch_grid=grid)
  _, (terms, _) = loss_fn(params, {"patch_teacher": teacher}, batch, jax.random.PRNGKey(1))
  student = model.apply({"params": params}, batch)
  reference_tokens = patch_teacher.patch_tokens(teacher, batch["item_image"], grid)
  want = spatial_relation_reference(
      np.asarray(student["item_patches"]), np.asarray(reference_tokens),
      np.asarray(batch["spatial_target"]) > 0, config.loss.srd_temperature)
  np.testing.assert_allclose(float(terms["srd"]), want, rtol=1e-4)
