"""The one place every experiment config is built from.

`configs/*.py` are thin: each calls `experiment_config(stage, preset)` and sets the few
keys that make its stage. A preset sets sizes (model, images, batch, steps) for a kind
of machine: `micro` (unit tests, seconds), `tiny` (the CPU default, minutes), `b16`
(the paper's ViT-B/16 query tower, for accelerators).

Config keys (every one read somewhere; unknown keys are rejected by `validate`):
  seed                      int, master PRNG seed.
  stage                     'teacher' | 'distill' | 'clip_style'.
  model.vision_variant      ViT size name for `models.vision.decode_variant`.
  model.patch_size          patch side in pixels.
  model.posemb_grid         G: the ViT's position embedding is learned on a G x G grid
                            and resampled to other grids (query and item images may
                            differ in size); usually data.item_image_size / patch_size.
  model.num_registers       R register tokens.
  model.text_variant        text transformer size name.
  model.vocab_size          set from the tokenizer at run time (0 = not yet known).
  model.max_title_len       L, title tokens incl. BOS/EOS.
  model.embed_dim           E, the retrieval embedding width (256).
  model.pooling_slots       K learnable slot queries of TextGuidedPooling.
  model.pooling_heads       heads of the pooling attentions.
  model.pooling_mlp_dim     MLP width in the pooling/merge blocks.
  model.mode                'tiger' (text-guided pooling) | 'clip_style' (global pool).
  model.share_vision        query and item towers share the ViT.
  model.query_pool          'cls' | 'map'.
  model.dtype               compute dtype 'float32' | 'bfloat16' (params stay float32).
  model.temperature_init    initial tau.
  model.temperature_min     tau is clipped to [temperature_min, 1].
  model.pixel_mean / pixel_std  per-channel normalisation of 0..255 pixels.
  model.vision_pre_norm     a LayerNorm over the ViT's tokens before its blocks (CLIP).
  model.mlp_activation      'gelu' (exact) | 'quick_gelu' (OpenAI CLIP): the ViT's and
                            the text encoder's MLPs.
  model.norm_eps            LayerNorm epsilon of the ViT and text encoder (CLIP: 1e-5).
  model.text_causal         causal self-attention in the text encoder (CLIP).
  model.text_pool           'mean' over the real title tokens | 'eos' (the last real
                            token, CLIP).
  model.text_proj_dim       > 0: a bias-free Dense to this width after the text pooling
                            (CLIP's text projection); 0: none.
  data.*, train.*, loss.*, teacher.*, mesh.*, eval.*: see the comments below.
"""

from __future__ import annotations

import os

import ml_collections

PRESETS = ("micro", "tiny", "b16")
STAGES = ("teacher", "distill", "clip_style")

_CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
_CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


# (item image side, query image side, synthetic train items, items per eval split,
# cells per side of a cluttered image).
_DATA_SIZES = {
    "micro": (32, 32, 48, 0, 2),
    "tiny": (64, 64, 3200, 200, 2),
    "b16": (224, 224, 4000, 0, 3),
}


def _model_config(preset: str) -> ml_collections.ConfigDict:
  vision, text, patch, slots, heads, mlp = {
      "micro": ("mu", "mu", 8, 2, 2, 64),
      "tiny": ("pico", "pico", 8, 4, 4, 192),
      "b16": ("B/16", "S", 16, 8, 8, 1024),
  }[preset]
  item_size = _DATA_SIZES[preset][0]
  return ml_collections.ConfigDict(dict(
      vision_variant=vision,
      patch_size=patch,
      posemb_grid=item_size // patch,
      num_registers=0 if preset == "micro" else 4,
      text_variant=text,
      vocab_size=0,
      max_title_len=16 if preset != "b16" else 32,
      embed_dim=256,
      pooling_slots=slots,
      pooling_heads=heads,
      pooling_mlp_dim=mlp,
      mode="tiger",
      share_vision=True,
      query_pool="cls",
      dtype="float32",
      temperature_init=0.07,
      temperature_min=0.01,
      pixel_mean=_CLIP_MEAN,
      pixel_std=_CLIP_STD,
      vision_pre_norm=False,
      mlp_activation="gelu",
      norm_eps=1e-6,
      text_causal=False,
      text_pool="mean",
      text_proj_dim=0,
  ))


def _data_config(preset: str) -> ml_collections.ConfigDict:
  item_size, query_size, items, eval_items, clutter_grid = _DATA_SIZES[preset]
  return ml_collections.ConfigDict(dict(
      # Dataset folder (DESIGN.md section 4). None: write the synthetic catalog to
      # WORKDIR/data and use it.
      root=ml_collections.FieldReference(None, field_type=str),
      synthetic_items=items,        # products in the synthetic train split.
      synthetic_eval_items=eval_items,  # items of each eval split (0: a quarter of train).
      # Cluttered images: a grid x grid layout, one product per cell. 2 at 64 px keeps a
      # target at 3-4 patches a side, as 0.3 of a 224 px image is at 16 px patches.
      synthetic_clutter_grid=clutter_grid,
      synthetic_seed=0,
      synthetic_image_size=max(item_size, 64),
      item_image_size=item_size,
      query_image_size=query_size,
      # Fraction of training items drawn as mosaics. Low at 64 px: a 2x2 tile halves a
      # product to a few patches, and at 0.5 eval_normal R@1 fell by 13 points.
      mosaic_prob=0.1 if preset == "tiny" else 0.5,
      mosaic_grid=2,                # mosaic of grid x grid tiles.
      skip_bad=False,               # skip invalid records (counted) instead of failing.
      # Grain worker processes building training examples: 0 = threads of the training
      # process; -1 = the cores this process may use less 2 (pipeline.worker_count).
      worker_count=-1 if preset == "b16" else 0,
      # True: the train step flips and colour-jitters the queries on the accelerator
      # (data/device_augment.py); the input pipeline only crops them.
      device_augment=preset == "b16",
      vocab_size=512,               # size of the tokenizer trained on train titles.
      tokenizer=ml_collections.FieldReference(None, field_type=str),  # user vocab file.
  ))


def _train_config(preset: str) -> ml_collections.ConfigDict:
  steps, batch, lr = {
      "micro": (6, 8, 1e-3),
      "tiny": (300, 32, 1e-3),
      "b16": (20_000, 1024, 5e-4),
  }[preset]
  return ml_collections.ConfigDict(dict(
      steps=steps,
      batch_size=batch,             # global batch, divisible by the 'data' mesh axis.
      learning_rate=lr,
      warmup_steps=max(1, steps // 20),
      weight_decay=0.05,
      grad_clip_norm=1.0,
      log_every=max(1, steps // 30),
      checkpoint_every=max(1, steps // 4),
      keep_checkpoints=2,
  ))


def _loss_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      w_infonce=1.0,                # L_q2i.
      w_sim=0.0,                    # L_SDD similarity-distribution KL vs the teacher.
      w_spatial=0.0,                # spatial-map KL of the student's attention.
      spatial_target="box",         # 'box' (box mask on the patch grid) | 'teacher'.
      kd_temperature=1.0,           # T of similarity_kl.
  ))


def experiment_config(stage: str, preset: str | None) -> ml_collections.ConfigDict:
  """Returns the full config of `stage` at `preset` (default 'tiny')."""
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}")
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stage = stage
  config.preset = preset
  config.model = _model_config(preset)
  config.data = _data_config(preset)
  config.train = _train_config(preset)
  config.loss = _loss_config()
  # Teacher for distillation: a checkpoint directory written by a `teacher` run. None
  # in the `distill` stage: train it first in WORKDIR/teacher.
  config.teacher = ml_collections.ConfigDict(dict(
      checkpoint=ml_collections.FieldReference(None, field_type=str),
      # Start the student from the teacher's weights (stage 2 continues stage 1; the
      # teacher needs the student's config.model).
      init_student=False,
  ))
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,                      # -1: all devices not used by 'model'.
      model=1,
      param_sharding="replicated",  # 'replicated' | 'fsdp' | 'tensor'.
  ))
  config.eval = ml_collections.ConfigDict(dict(
      backend="scann",              # 'scann' | 'exact' | 'approx'.
      batch_size=64,
      every=0,                      # evaluate every N steps too (0 = only at the end).
  ))
  if stage == "distill":
    config.loss.w_sim = 1.0
    config.loss.w_spatial = 0.5
    config.teacher.init_student = True
  if stage == "clip_style":
    config.model.mode = "clip_style"
    config.data.mosaic_prob = 0.0
  return config


_CHOICES = {
    "model.mode": ("tiger", "clip_style"),
    "model.query_pool": ("cls", "map"),
    "model.dtype": ("float32", "bfloat16"),
    "model.mlp_activation": ("gelu", "quick_gelu"),
    "model.text_pool": ("mean", "eos"),
    "loss.spatial_target": ("box", "teacher"),
    "mesh.param_sharding": ("replicated", "fsdp", "tensor"),
    "eval.backend": ("scann", "exact", "approx"),
}


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      keys |= _flat_keys(value, f"{prefix}{key}.")
    else:
      keys.add(f"{prefix}{key}")
  return keys


def _get(config: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every bad key before any work is done."""
  if config.get("stage") not in STAGES or config.get("preset") not in PRESETS:
    raise ValueError(f"config.stage={config.get('stage')!r} / config.preset="
                     f"{config.get('preset')!r}: expected a stage in {STAGES} and a "
                     f"preset in {PRESETS}")
  reference = experiment_config(config.stage, config.preset)
  problems = [f"unknown key config.{k}"
              for k in sorted(_flat_keys(config) - _flat_keys(reference))]
  problems += [f"missing key config.{k}"
               for k in sorted(_flat_keys(reference) - _flat_keys(config))]
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))
  for key, allowed in _CHOICES.items():
    if _get(config, key) not in allowed:
      problems.append(f"config.{key}={_get(config, key)!r}: expected one of {allowed}")
  for key in ("loss.w_infonce", "loss.w_sim", "loss.w_spatial"):
    if _get(config, key) < 0:
      problems.append(f"config.{key}={_get(config, key)}: weights must be >= 0")
  for key in ("model.posemb_grid", "train.steps", "train.batch_size", "train.log_every",
              "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size"):
    if _get(config, key) < 1:
      problems.append(f"config.{key}={_get(config, key)}: expected a positive integer")
  for key in ("data.item_image_size", "data.query_image_size"):
    if _get(config, key) % config.model.patch_size:
      problems.append(f"config.{key}={_get(config, key)} is not a multiple of "
                      f"config.model.patch_size={config.model.patch_size}")
  if config.data.worker_count < -1:
    problems.append(f"config.data.worker_count={config.data.worker_count}: expected -1 "
                    "(from the cores) or >= 0")
  if not 0 <= config.data.mosaic_prob <= 1:
    problems.append(f"config.data.mosaic_prob={config.data.mosaic_prob}: expected [0, 1]")
  if config.data.root and not os.path.isdir(config.data.root):
    problems.append(f"config.data.root={config.data.root!r}: no such directory")
  teacher = config.teacher.checkpoint
  if teacher and not os.path.exists(os.path.join(teacher, "checkpoints")):
    problems.append(f"config.teacher.checkpoint={teacher!r}: expected the workdir of a "
                    "teacher run (with checkpoints/ and config.json)")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))
