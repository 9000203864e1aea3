r"""Converts a DINOv2 checkpoint into a patch teacher folder for the spatial-relation
distillation loss L_SRD (docs/ARCHITECTURE.md "Patch teacher (L_SRD)").

  python -m tigerfg_jax.convert --format=dinov2 --checkpoint=PATH --out=DIR \
      [--allow_pickle] [--noprobe]

PATH: a Hugging Face `Dinov2Model` or `Dinov2WithRegistersModel` folder as
`save_pretrained` writes it: `config.json` and `model.safetensors` (or a pickled
`pytorch_model.bin`, read with torch only under `--allow_pickle`), and optionally
`preprocessor_config.json` (its `image_mean` / `image_std`; ImageNet's otherwise, which
is what DINOv2 uses). Nothing is downloaded.

DIR receives (`models.patch_teacher`): `patch_teacher.json` (the ViT's sizes, LayerScale,
epsilon, position grid, pixel mean/std), `params/` (Orbax) and `convert_report.json`
(what was mapped, what was dropped and why, tensors left unused, and, when torch and
transformers are installed, the largest difference between the converted ViT and the
checkpoint's own model on random probe images: every token at the native grid, and the
patch tokens at a smaller grid through `patch_teacher.patch_tokens`).
Training reads DIR with `models.patch_teacher.load_patch_teacher`.

Supported: exact-GELU MLPs (every DINOv2 but ViT-g, whose SwiGLU MLP is refused).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from absl import logging

from tigerfg_jax import cli
from tigerfg_jax.convert import clip
from tigerfg_jax.convert import dinov2_layout as layout
from tigerfg_jax.convert.clip_layout import ConversionError
from tigerfg_jax.models import patch_teacher

MODEL_TYPES = {"dinov2": "bicubic", "dinov2_with_registers": "bicubic_antialias"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Dinov2Config's defaults, for keys a config.json leaves out.
_DEFAULTS = dict(mlp_ratio=4, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                 use_swiglu_ffn=False, layerscale_value=1.0, num_register_tokens=0)
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")


def read_config(config_path: str) -> dict[str, Any]:
  """The DINOv2 `config.json` with defaults filled in; ConversionError naming the file
  and the key when it is not a supported DINOv2 config."""
  with open(config_path) as f:
    content = json.load(f)
  model_type = content.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ConversionError(f"{config_path}: model_type={model_type!r}; expected one of "
                          f"{sorted(MODEL_TYPES)} (a Hugging Face Dinov2Model folder)")
  missing = [key for key in _REQUIRED if key not in content]
  if missing:
    raise ConversionError(f"{config_path}: missing keys {missing}")
  config = {**_DEFAULTS, **content}
  if config["use_swiglu_ffn"]:
    raise ConversionError(f"{config_path}: use_swiglu_ffn=true (ViT-g's SwiGLU MLP) is "
                          "not supported; the ViT's MLP is Dense-GELU-Dense")
  if config["hidden_act"] != "gelu":
    raise ConversionError(f"{config_path}: hidden_act={config['hidden_act']!r}; only "
                          "'gelu' (exact) is supported")
  return config


def _pixel_stats(folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  path = os.path.join(folder, "preprocessor_config.json")
  if not os.path.exists(path):
    return IMAGENET_MEAN, IMAGENET_STD
  with open(path) as f:
    content = json.load(f)
  return (tuple(content.get("image_mean", IMAGENET_MEAN)),
          tuple(content.get("image_std", IMAGENET_STD)))


def make_spec(config: dict[str, Any], state: dict[str, np.ndarray], folder: str
              ) -> patch_teacher.PatchTeacherSpec:
  """The spec of the ViT that computes what the checkpoint computes."""
  num_positions = math.prod(state[layout.POSITIONS].shape[:-1]) - 1
  grid = math.isqrt(num_positions)
  if grid * grid != num_positions:
    raise ConversionError(f"{layout.POSITIONS}: {num_positions} patch positions are not "
                          "a square grid")
  mean, std = _pixel_stats(folder)
  width = int(config["hidden_size"])
  return patch_teacher.PatchTeacherSpec(
      width=width, depth=int(config["num_hidden_layers"]),
      mlp_dim=int(width * config["mlp_ratio"]),
      num_heads=int(config["num_attention_heads"]), patch_size=int(config["patch_size"]),
      posemb_grid=grid, num_registers=int(config["num_register_tokens"]),
      norm_eps=float(config["layer_norm_eps"]),
      layer_scale=float(config["layerscale_value"]), activation="gelu",
      pixel_mean=mean, pixel_std=std, posemb_resize=MODEL_TYPES[config["model_type"]],
      source=os.path.abspath(folder))


def build_params(spec: patch_teacher.PatchTeacherSpec, config: dict[str, Any],
                 state: dict[str, np.ndarray], config_path: str
                 ) -> tuple[dict[str, Any], dict[str, list[str]]]:
  """`(params tree, {our path: checkpoint sources})`; ConversionError listing every
  missing tensor or shape mismatch."""
  abstract = patch_teacher.abstract_params(spec)
  targets = {path: tuple(a.shape) for path, a in clip.flat_params(abstract).items()}
  depth = layout.num_layers(state)
  if depth != spec.depth:
    raise ConversionError(f"the checkpoint has {depth} blocks (encoder.layer.N), "
                          f"{config_path} says num_hidden_layers={spec.depth}")
  entries = layout.vision_entries(depth, spec.num_registers, bool(config["qkv_bias"]))
  missing = sorted({s for e in entries.values() for s in e.sources} - set(state))
  clip.raise_if([f"{name}: missing from the checkpoint" for name in missing],
                 "the checkpoint lacks tensors of a DINOv2 ViT")
  built = clip.build_params(entries, targets, state)
  params = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(abstract),
      [jnp.asarray(built[path]) for path in clip.flat_params(abstract)])
  return params, {p: list(e.sources) for p, e in sorted(entries.items())}


def _probe(folder: str, teacher: patch_teacher.PatchTeacher) -> dict[str, Any]:
  """Max abs differences to the checkpoint's own transformers model on random images."""
  try:
    import torch
    import transformers
  except ImportError as error:
    return {"skipped": f"needs torch and transformers ({error})"}
  spec = teacher.spec
  model = transformers.AutoModel.from_pretrained(folder).eval()
  rng = np.random.default_rng(0)
  mean, std = np.asarray(spec.pixel_mean), np.asarray(spec.pixel_std)

  def reference(images: np.ndarray) -> np.ndarray:
    pixels = ((images / 255.0 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
      return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()

  native = rng.integers(0, 256, (2, *(2 * [spec.posemb_grid * spec.patch_size]), 3))
  ours = teacher.module.apply(
      {"params": teacher.params},
      jnp.asarray((native / 255.0 - mean) / std, jnp.float32))
  small_grid = max(1, spec.posemb_grid // 2)
  small = rng.integers(0, 256, (2, *(2 * [small_grid * spec.patch_size]), 3))
  ours_small = patch_teacher.patch_tokens(teacher, jnp.asarray(small, jnp.uint8),
                                          small_grid)
  return {
      "native_grid": spec.posemb_grid,
      "max_abs_diff_native_all_tokens": float(np.abs(ours - reference(native)).max()),
      "probe_grid": small_grid,
      "max_abs_diff_probe_grid_patch_tokens": float(np.abs(
          ours_small - reference(small)[:, 1 + spec.num_registers:]).max()),
  }


def convert(checkpoint: str, out: str, *, allow_pickle: bool = False,
            probe: bool = True) -> dict[str, Any]:
  """Writes the patch teacher folder `out` from a DINOv2 checkpoint folder; returns the
  report (also saved as `convert_report.json`).

  Raises:
    ConversionError: not a DINOv2 folder, a refused pickle, missing tensors or shapes
      that differ from its config.json (each named).
  """
  if os.path.exists(os.path.join(out, patch_teacher.SPEC_FILE)):
    raise ConversionError(f"--out={out} already holds a patch teacher; choose a new folder")
  if not os.path.isdir(checkpoint):
    raise ConversionError(f"--checkpoint={checkpoint}: expected a Hugging Face Dinov2Model "
                          "folder (config.json + model.safetensors)")
  weights, config_path = clip.find_checkpoint(checkpoint)
  if config_path is None or os.path.basename(config_path) != "config.json":
    raise ConversionError(f"--checkpoint={checkpoint}: no config.json in the folder")
  config = read_config(config_path)
  state = layout.to_hub_layout(clip.read_state_dict(weights, allow_pickle))
  layout.check_is_dinov2(state, weights)
  spec = make_spec(config, state, checkpoint)
  params, loaded = build_params(spec, config, state, config_path)
  dropped = layout.dropped_tensors(state)

  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, patch_teacher.SPEC_FILE), "w") as f:
    json.dump(spec.to_json(), f, indent=2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(os.path.join(out, patch_teacher.PARAMS_DIR)), params)
  checkpointer.wait_until_finished()

  teacher = patch_teacher.load_patch_teacher(out)
  used = {s for sources in loaded.values() for s in sources}
  report = {
      "checkpoint": os.path.abspath(checkpoint),
      "weights_file": os.path.abspath(weights),
      "model_type": config["model_type"],
      "spec": spec.to_json(),
      "loaded": {path: sources for path, sources in loaded.items() if sources},
      "zero_filled": sorted(path for path, sources in loaded.items() if not sources),
      "dropped": dropped,
      "unused_checkpoint_tensors": sorted(set(state) - used - set(dropped)),
      "probe": _probe(checkpoint, teacher) if probe else {"skipped": "--noprobe"},
  }
  with open(os.path.join(out, clip.REPORT_FILE), "w") as f:
    json.dump(report, f, indent=2)
  print(format_report(report, out))
  return report


def format_report(report: dict[str, Any], out: str) -> str:
  spec = report["spec"]
  lines = [f"Converted {report['weights_file']} ({report['model_type']}) into the patch "
           f"teacher {out}",
           f"  ViT: width {spec['width']}, depth {spec['depth']}, {spec['num_heads']} heads, "
           f"patch {spec['patch_size']}, grid {spec['posemb_grid']}, "
           f"{spec['num_registers']} registers",
           f"  loaded: {len(report['loaded'])} arrays; zero-filled: "
           f"{len(report['zero_filled'])}"]
  lines += [f"  dropped {name}: {why}" for name, why in sorted(report["dropped"].items())
            if "key bias" not in why]
  keys = sum("key bias" in why for why in report["dropped"].values())
  if keys:
    lines.append(f"  dropped {keys} attention key biases (no effect on any output)")
  if report["unused_checkpoint_tensors"]:
    lines.append("  unused checkpoint tensors: "
                 + ", ".join(report["unused_checkpoint_tensors"]))
  lines.append(f"  probe: {report['probe']}")
  lines.append(f"  report: {os.path.join(out, clip.REPORT_FILE)}")
  return "\n".join(lines)


# ------------------------------------------------------------------------- CLI ---

def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "Hugging Face Dinov2Model folder.", required=True)
  flags.DEFINE_string("out", None, "Patch teacher folder to write.", required=True)
  flags.DEFINE_bool("allow_pickle", False,
                    "Read a pickled pytorch_model.bin (torch.load(weights_only=True)).")
  flags.DEFINE_bool("probe", True, "Compare the converted ViT with the transformers "
                    "model on random images (needs torch and transformers).")


def main(argv):
  cli.no_arguments(argv)
  logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  convert(args.checkpoint, args.out, allow_pickle=args.allow_pickle, probe=args.probe)
