r"""Imports a CLIP checkpoint into a tigerfg_jax workdir (docs/ARCHITECTURE.md
"Converting checkpoints").

  python -m tigerfg_jax.convert --checkpoint=PATH --config=configs/distill.py[:preset] \
      --out=DIR [--allow_pickle] [--config.KEY=VALUE ...]

(`--format=dinov2` converts a DINOv2 checkpoint into a patch teacher instead:
`convert.dinov2`, `--format=dinov2 --help`.)

PATH: a Hugging Face `CLIPModel` folder (`model.safetensors` + `config.json`, as
`save_pretrained` writes it), a `.safetensors` file, or a PyTorch state dict
(`.bin` / `.pt` / `.pth`, Hugging Face or open_clip ViT layout; see
`convert.clip_layout`). Pickled files run code when read, so they are refused unless
`--allow_pickle` (then read with `torch.load(weights_only=True)`). Nothing is downloaded.

DIR receives a run folder before its first step (`tigerfg_jax.workdir`): `config.json`,
`tokenizer.json` (a copy of `config.data.tokenizer`, when set), `init_params/` (the
model's params with the CLIP weights in place; a run on DIR starts from them with a
fresh optimizer and input pipeline) and `convert_report.json` (which
parameters were loaded, zero-filled or newly initialised; which checkpoint tensors
were dropped as having no effect, and which went unused).
Then `python -m tigerfg_jax.main --config=<the same> --workdir=DIR` trains from the
imported weights, and DIR also serves as `config.teacher.checkpoint`.

The model must compute what CLIP computes, so the config has to say so (the converter
checks and lists the overrides it needs): `model.vision_pre_norm` (CLIP's pre-LN),
`model.mlp_activation` ('quick_gelu' for OpenAI weights), `model.norm_eps` (1e-5),
`model.text_causal=True` and `model.text_pool='eos'` (CLIP's text transformer is causal
and pools at the end token; our titles end with EOS then padding, so "last real
token" is CLIP's pooling position). CLIP's text projection is loaded when
`model.text_proj_dim` equals its width, and reported unused when it is 0. CLIP's
attention key biases are dropped: our attention has none, and they cannot change
any output (the softmax over keys ignores a per-query constant).

What CLIP has no counterpart for is newly initialised as a fresh run would (the
pooling heads, the item projection, the temperature, ViT registers: with
`model.num_registers > 0` the ViT no longer computes CLIP's function exactly until
trained). With `model.share_vision=False` both ViTs receive CLIP's vision tower.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import flags
from absl import logging
from ml_collections import config_flags

from tigerfg_jax import cli
from tigerfg_jax import config_lib
from tigerfg_jax import sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.convert import clip_layout as layout
from tigerfg_jax.convert.clip_layout import ConversionError
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.models import factory

REPORT_FILE = "convert_report.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# Hugging Face `hidden_act` / open_clip `quick_gelu` -> `config.model.mlp_activation`.
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# nn.LayerNorm's default, used by every CLIP layout unless its config says otherwise.
_CLIP_NORM_EPS = 1e-5

VISION_TOWERS = ("vision", "item_vision")
TEXT_ENCODER = "item_tower/text_encoder"
QUERY_PROJECTION = "query_tower/projection"


# ----------------------------------------------------------------- reading files ---

def find_checkpoint(path: str) -> tuple[str, str | None]:
  """`(weights file, config file or None)` for a checkpoint file or folder."""
  if not os.path.exists(path):
    raise ConversionError(f"--checkpoint={path}: no such file or directory")
  if os.path.isdir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES))
    safetensors = [f for f in files if f.endswith(".safetensors")]
    chosen = safetensors or files
    if len(chosen) != 1:
      raise ConversionError(
          f"--checkpoint={path}: expected one weights file (.safetensors, or a pickled "
          f"{'/'.join(PICKLE_SUFFIXES)}) in the folder, found {chosen or 'none'} "
          "(sharded checkpoints are not supported)")
    weights, folder = os.path.join(path, chosen[0]), path
  elif path.endswith(WEIGHT_SUFFIXES):
    weights, folder = path, os.path.dirname(os.path.abspath(path))
  else:
    raise ConversionError(f"--checkpoint={path}: expected a .safetensors file, a "
                          f"{'/'.join(PICKLE_SUFFIXES)} state dict or a folder")
  for name in ("config.json", "open_clip_config.json"):
    if os.path.exists(os.path.join(folder, name)):
      return weights, os.path.join(folder, name)
  return weights, None


def _import_torch(why: str):
  try:
    import torch
  except ImportError as error:
    raise ConversionError(f"{why}: install torch (pip install -r requirements-test.txt)"
                          ) from error
  return torch


def _torch_to_numpy(tensor) -> np.ndarray:
  tensor = tensor.detach().cpu()
  return (tensor.float() if tensor.is_floating_point() else tensor).numpy()


def read_state_dict(weights: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """`{name: array}` of a safetensors file or (with `allow_pickle`) a torch state dict.

  Floating tensors come back as float32 (the parameters' dtype), whatever they were
  stored in (float16, bfloat16). An open_clip training checkpoint
  (`{'state_dict': ...}`) is unwrapped and a DistributedDataParallel `module.` prefix
  dropped.
  """
  if weights.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise ConversionError(
          f"{weights}: a pickled PyTorch file can run arbitrary code when loaded; "
          "refusing it. Convert it to .safetensors, or pass --allow_pickle if you trust "
          "it (it is then read with torch.load(weights_only=True))")
    torch = _import_torch(f"{weights} is a PyTorch pickle")
    loaded = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
      loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
      raise ConversionError(f"{weights}: expected a state dict, got {type(loaded).__name__}")
    state = {k: _torch_to_numpy(v) for k, v in loaded.items() if hasattr(v, "detach")}
  else:
    try:
      from safetensors import numpy as safetensors_numpy
    except ImportError as error:
      raise ConversionError(f"{weights}: reading safetensors needs the safetensors "
                            "package (pip install safetensors)") from error
    # bfloat16 reads as ml_dtypes.bfloat16 (registered with NumPy by jax).
    state = safetensors_numpy.load_file(weights)
  return {k.removeprefix("module."): v.astype(np.float32) if v.dtype.kind not in "iub" else v
          for k, v in state.items()}


# ------------------------------------------------------ what the model must be ---

@dataclasses.dataclass(frozen=True)
class CheckpointFacts:
  """Architecture facts a state dict does not show; None where the files do not say."""
  activation: str | None
  norm_eps: float
  vision_heads: int | None
  text_heads: int | None


def checkpoint_facts(config_path: str | None) -> CheckpointFacts:
  """Reads the activation, LayerNorm epsilon and head counts from the config file.

  Hugging Face `config.json` (missing fields take CLIPConfig's defaults: quick_gelu,
  1e-5) or open_clip's `open_clip_config.json` (`model_cfg.quick_gelu`, default
  False = exact GELU). Without a CLIP config file only the epsilon is known (1e-5 in
  both layouts).
  """
  if config_path is None:
    return CheckpointFacts(None, _CLIP_NORM_EPS, None, None)
  with open(config_path) as f:
    content = json.load(f)
  if "model_cfg" in content:
    quick = content["model_cfg"].get("quick_gelu", False)
    return CheckpointFacts("quick_gelu" if quick else "gelu", _CLIP_NORM_EPS, None, None)
  towers = {k: content.get(f"{k}_config") for k in ("vision", "text")}
  towers = {k: v for k, v in towers.items() if v is not None}
  if not towers:  # Some other program's config.json next to the weights.
    return CheckpointFacts(None, _CLIP_NORM_EPS, None, None)
  acts = {k: v.get("hidden_act", "quick_gelu") for k, v in towers.items()}
  eps = {k: v.get("layer_norm_eps", _CLIP_NORM_EPS) for k, v in towers.items()}
  for name, values in (("hidden_act", acts), ("layer_norm_eps", eps)):
    if len(set(values.values())) > 1:
      raise ConversionError(f"{config_path}: the towers differ in {name} ({values}); "
                            "config.model has one value for both encoders")
  activation = next(iter(acts.values()))
  if activation not in _ACTIVATIONS:
    raise ConversionError(f"{config_path}: hidden_act={activation!r} is not supported; "
                          f"expected one of {sorted(_ACTIVATIONS)}")
  return CheckpointFacts(
      _ACTIVATIONS[activation], float(next(iter(eps.values()))),
      towers.get("vision", {}).get("num_attention_heads"),
      towers.get("text", {}).get("num_attention_heads"))


def required_model_options(state: dict[str, np.ndarray],
                           facts: CheckpointFacts) -> dict[str, Any]:
  """`{config.model key: value}` the model needs to compute what CLIP computes."""
  required: dict[str, Any] = {"norm_eps": facts.norm_eps}
  if layout.VISION_ANCHOR in state:
    required["vision_pre_norm"] = layout.VISION_PRE_NORM in state
  if layout.TEXT_ANCHOR in state:
    required.update(text_causal=True, text_pool="eos")
  if facts.activation is not None:
    required["mlp_activation"] = facts.activation
  return required


def check_model_options(model_config: ml_collections.ConfigDict,
                        required: dict[str, Any]) -> None:
  """Raises ConversionError listing every `config.model` key that differs from CLIP."""
  problems = []
  for key, wanted in required.items():
    have = model_config[key]
    if (have != wanted if not isinstance(wanted, float)
        else not math.isclose(have, wanted, rel_tol=1e-9)):
      problems.append(f"config.model.{key}={have!r}; the checkpoint needs {wanted!r}")
  if problems:
    overrides = " ".join(f"--config.model.{k}={v}" for k, v in required.items())
    raise ConversionError(
        "the configured model does not compute what the CLIP checkpoint computes:\n  "
        + "\n  ".join(problems) + f"\nConvert and train with: {overrides}")


# ------------------------------------------------------------------ the mapping ---

def flat_params(tree: Any) -> dict[str, Any]:
  """`{'vision/cls': leaf, ...}`: a parameter tree keyed by slash-joined paths."""
  return {workdir_lib.path_name(p): leaf
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _depth(targets: dict[str, tuple[int, ...]], prefix: str) -> int:
  depth = 0
  while f"{prefix}/encoder/block_{depth}/norm1/scale" in targets:
    depth += 1
  return depth


def _heads(targets: dict[str, tuple[int, ...]], prefix: str) -> int:
  return targets[f"{prefix}/encoder/block_0/attn/query/kernel"][1]


def plan(targets: dict[str, tuple[int, ...]], state: dict[str, np.ndarray],
         facts: CheckpointFacts) -> tuple[dict[str, layout.Entry], list[str]]:
  """`({our param path: Entry}, dropped)` for every parameter the checkpoint provides.

  A part (vision tower, text tower, each projection) is loaded when the checkpoint
  has it; then every tensor of it must be there, with as many blocks and heads as the
  model has. `dropped` names the checkpoint tensors of loaded towers that the model
  has no place for because they cannot change its function (the key biases).
  """
  entries: dict[str, layout.Entry] = {}
  dropped: list[str] = []
  problems = []

  def check_tower(ours: str, tower: str, heads: int | None, variant_key: str) -> int:
    depth = _depth(targets, ours)
    theirs = layout.num_layers(state, tower)
    if theirs != depth:
      problems.append(f"{tower}: the checkpoint has {theirs} blocks, the model "
                      f"({variant_key}) has {depth} at {ours}/encoder")
    if heads is not None and depth and heads != _heads(targets, ours):
      problems.append(f"{tower}: the checkpoint has {heads} attention heads, the model "
                      f"({variant_key}) has {_heads(targets, ours)}")
    return depth

  if layout.VISION_ANCHOR in state:
    for ours in VISION_TOWERS:
      if f"{ours}/cls" in targets:
        depth = check_tower(ours, "vision_model", facts.vision_heads,
                            "config.model.vision_variant")
        entries.update(layout.vision_entries(ours, depth, f"{ours}/pre_norm/scale" in targets))
    dropped += layout.key_biases(state, "vision_model")
    if layout.VISUAL_PROJECTION in state:
      entries.update(layout.projection_entries(
          QUERY_PROJECTION, layout.VISUAL_PROJECTION, f"{QUERY_PROJECTION}/bias" in targets))
  if layout.TEXT_ANCHOR in state:
    depth = check_tower(TEXT_ENCODER, "text_model", facts.text_heads,
                        "config.model.text_variant")
    entries.update(layout.text_entries(TEXT_ENCODER, depth))
    dropped += layout.key_biases(state, "text_model")
    if layout.TEXT_PROJECTION in state and f"{TEXT_ENCODER}/projection/kernel" in targets:
      entries.update(layout.projection_entries(
          f"{TEXT_ENCODER}/projection", layout.TEXT_PROJECTION,
          f"{TEXT_ENCODER}/projection/bias" in targets))
  problems += [f"{path}: the mapping expects this parameter but the model has none"
               for path in entries if path not in targets]
  # Checked after the block counts, which would otherwise list every missing block.
  raise_if(problems, "the checkpoint does not fit the configured model")
  missing = sorted({s for e in entries.values() for s in e.sources} - set(state))
  raise_if([f"{name}: missing from the checkpoint" for name in missing],
            "the checkpoint lacks tensors of a part it has")
  return entries, sorted(dropped)


# The config key that sets the shape of the parameters under each prefix (first match).
_SHAPE_KEYS = (
    ("query_tower/projection/", "config.model.embed_dim"),
    (f"{TEXT_ENCODER}/projection/", "config.model.text_proj_dim"),
    (f"{TEXT_ENCODER}/token_embed/", "the tokenizer's vocabulary, config.data.tokenizer"),
    (f"{TEXT_ENCODER}/pos_embedding", "config.model.max_title_len"),
    (f"{TEXT_ENCODER}/", "config.model.text_variant"),
    ("vision/pos_embedding", "config.model.posemb_grid"),
    ("item_vision/pos_embedding", "config.model.posemb_grid"),
    ("vision/patch_embed/", "config.model.patch_size / vision_variant"),
    ("item_vision/patch_embed/", "config.model.patch_size / vision_variant"),
    ("vision/", "config.model.vision_variant"),
    ("item_vision/", "config.model.vision_variant"),
)


def build_params(entries: dict[str, layout.Entry], targets: dict[str, tuple[int, ...]],
                 state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """float32 arrays in our layout; every shape mismatch is reported at once."""
  built, problems = {}, []
  for path, entry in entries.items():
    try:
      built[path] = np.asarray(
          entry.build(targets[path], *(state[s] for s in entry.sources)), np.float32)
    except ConversionError as error:
      key = next((k for prefix, k in _SHAPE_KEYS if path.startswith(prefix)), None)
      problems.append(f"{error}" + (f" [set by {key}]" if key else ""))
  raise_if(problems, "shapes differ between the checkpoint and the configured model")
  return built


def raise_if(problems: list[str], headline: str) -> None:
  if problems:
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ConversionError(f"{headline} ({len(problems)} problems):\n  "
                          + "\n  ".join(problems[:20]) + more)


# --------------------------------------------------------------------- convert ---

def _vocab_size(state: dict[str, np.ndarray], tokenizer: TitleTokenizer | None) -> int:
  if tokenizer is not None:
    return tokenizer.vocab_size
  if layout.TEXT_ANCHOR not in state:
    raise ConversionError("the checkpoint has no text tower, so the vocabulary size is "
                          "unknown: set config.data.tokenizer to the tokenizer to train with")
  return int(state[layout.TEXT_ANCHOR].shape[0])


def fresh_params(model, config: ml_collections.ConfigDict, abstract: Any) -> Any:
  """A fresh init of `model`'s params (seed `config.seed`), laid out as `abstract`."""
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  init = jax.jit(lambda rng: nn.meta.unbox(model.init(rng, factory.dummy_batch(config, 2))
                                           )["params"], out_shardings=shardings)
  return init(jax.random.PRNGKey(config.seed))


def convert(checkpoint: str, config: ml_collections.ConfigDict, out: str, *,
            allow_pickle: bool = False) -> dict[str, Any]:
  """Writes the workdir `out` from a CLIP checkpoint; returns the report (also saved).

  Raises:
    ConversionError: unreadable or refused file, unsupported layout, a model that
      does not compute what CLIP computes, or shapes that differ (each named).
  """
  config = config.copy_and_resolve_references()
  config_lib.validate(config)
  if (os.path.isdir(os.path.join(out, workdir_lib.CHECKPOINTS_DIR))
      or workdir_lib.has_init_params(out)):
    raise ConversionError(f"--out={out} already holds a run; choose a new folder")

  weights, config_path = find_checkpoint(checkpoint)
  source_layout, state = layout.to_huggingface(read_state_dict(weights, allow_pickle),
                                               weights)
  facts = checkpoint_facts(config_path)
  tokenizer = (TitleTokenizer.load(config.data.tokenizer) if config.data.tokenizer
               else None)
  vocab_size = _vocab_size(state, tokenizer)

  model = factory.build_model(config, vocab_size)
  abstract = sharding.abstract_params(model, config, sharding.make_mesh(config.mesh))
  targets = {p: tuple(a.shape) for p, a in flat_params(abstract).items()}
  entries, dropped = plan(targets, state, facts)
  built = build_params(entries, targets, state)
  check_model_options(config.model, required_model_options(state, facts))

  fresh = fresh_params(model, config, abstract)
  params = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(fresh),
      [jax.device_put(built[name], leaf.sharding) if name in built else leaf
       for name, leaf in flat_params(fresh).items()])

  os.makedirs(out, exist_ok=True)
  workdir_lib.save_config(config, out)
  if tokenizer is not None:
    tokenizer.save(os.path.join(out, workdir_lib.TOKENIZER_FILE))
  workdir_lib.save_init_params(out, params)

  report = _report(checkpoint, weights, source_layout, entries, dropped, targets, state,
                   facts, vocab_size, tokenizer is not None)
  with open(os.path.join(out, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=2)
  print(format_report(report, out))
  return report


def _report(checkpoint: str, weights: str, source_layout: str,
            entries: dict[str, layout.Entry], dropped: list[str],
            targets: dict[str, tuple[int, ...]], state: dict[str, np.ndarray],
            facts: CheckpointFacts, vocab_size: int, has_tokenizer: bool
            ) -> dict[str, Any]:
  loaded = {p: list(e.sources) for p, e in sorted(entries.items()) if e.sources}
  zero_filled = sorted(p for p, e in entries.items() if not e.sources)
  new = sorted(p for p in targets if p not in entries)
  used = {s for e in entries.values() for s in e.sources}
  notes = []
  if facts.activation is None:
    notes.append("the checkpoint does not record its MLP activation; assumed "
                 "config.model.mlp_activation (OpenAI weights use quick_gelu)")
  if ((layout.VISION_ANCHOR in state and facts.vision_heads is None)
      or (layout.TEXT_ANCHOR in state and facts.text_heads is None)):
    notes.append("the checkpoint does not record its head counts; assumed the model's")
  if not has_tokenizer and layout.TEXT_ANCHOR in state:
    notes.append(f"no config.data.tokenizer: the text embedding keeps the checkpoint's "
                 f"{vocab_size} token ids; train with the matching tokenizer "
                 "(e.g. CLIP's tokenizer.json) as config.data.tokenizer")
  return {
      "checkpoint": os.path.abspath(checkpoint),
      "weights_file": os.path.abspath(weights),
      "layout": source_layout,
      "vocab_size": vocab_size,
      "loaded": loaded,
      "zero_filled": zero_filled,
      "newly_initialised": new,
      "dropped_no_effect": dropped,
      "unused_checkpoint_tensors": sorted(set(state) - used - set(dropped)),
      "param_counts": {
          "loaded": sum(math.prod(targets[p]) for p in loaded),
          "zero_filled": sum(math.prod(targets[p]) for p in zero_filled),
          "newly_initialised": sum(math.prod(targets[p]) for p in new),
      },
      "notes": notes,
  }


def format_report(report: dict[str, Any], out: str) -> str:
  """Console summary; newly initialised params grouped by their module."""
  groups = collections.Counter("/".join(path.split("/")[:2])
                               for path in report["newly_initialised"])
  counts = report["param_counts"]
  lines = [f"Converted {report['weights_file']} ({report['layout']} layout) into "
           f"{os.path.join(out, 'checkpoints', '0')}",
           f"  loaded:             {len(report['loaded'])} arrays, {counts['loaded']:,} params",
           f"  zero-filled biases: {len(report['zero_filled'])} arrays, "
           f"{counts['zero_filled']:,} params (CLIP has none there)",
           f"  newly initialised:  {len(report['newly_initialised'])} arrays, "
           f"{counts['newly_initialised']:,} params"]
  lines += [f"    {group} ({n} arrays)" for group, n in sorted(groups.items())]
  if report["dropped_no_effect"]:
    lines.append(f"  dropped, no effect: {len(report['dropped_no_effect'])} attention key "
                 "biases (a per-query constant logit, which the softmax ignores)")
  if report["unused_checkpoint_tensors"]:
    lines.append("  unused checkpoint tensors: "
                 + ", ".join(report["unused_checkpoint_tensors"]))
  lines += [f"  note: {note}" for note in report["notes"]]
  lines.append(f"  report: {os.path.join(out, REPORT_FILE)}")
  return "\n".join(lines)


# ------------------------------------------------------------------------- CLI ---

def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "CLIP weights: file or folder.", required=True)
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/distill.py[:preset].",
      lock_config=True)
  flags.DEFINE_string("out", None, "Workdir to write (must not hold a run).",
                      required=True)
  flags.DEFINE_bool("allow_pickle", False,
                    "Read pickled .bin/.pt/.pth files (torch.load(weights_only=True)).")
  flags.mark_flags_as_required(["config"])


def main(argv):
  cli.no_arguments(argv)
  # Orbax logs every save step at INFO; the report printed at the end says what happened.
  logging.set_verbosity(logging.WARNING)
  args = flags.FLAGS
  convert(args.checkpoint, args.config, args.out, allow_pickle=args.allow_pickle)

