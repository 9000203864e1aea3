"""The one place every experiment config is built from.

`configs/*.py` are thin: each calls `experiment_config(stage, preset)` and sets the few
keys that make its stage. A preset sets sizes (model, images, batch, steps) for a kind
of machine: `micro` (unit tests, seconds), `tiny` (the CPU default, minutes), `b16`
(the paper's ViT-B/16 query tower, for accelerators).

Config keys (every one read somewhere; unknown keys are rejected by `validate`):
  seed                      int, master PRNG seed.
  stage                     'teacher' | 'distill' | 'clip_style' | 'text_query'.
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
  model.dtype               compute dtype 'float32' | 'bfloat16' (params stay float32;
                            embeddings, attention maps and temperature are float32).
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
  model.attention           the ViT's and text encoder's self-attention:
                            'dot_product' (jax.nn.dot_product_attention) | 'einsum'
                            (explicit reference). Same parameters.
  model.remat               what the encoder blocks recompute in the backward pass:
                            'none' | 'full' | 'dots' | 'names' (models/transformer.py).
                            Same parameters.
  model.item_fusion         the item side: 'tiger' (the TIGER-FG item tower of
                            model.mode; every stage) or, for the text_query stage,
                            'concat' | 'beyond_text' | 'smar' | 'text' | 'image'
                            (models/fusion.py).
  model.text_query_encoder  text query tower: 'none' | 'title' (the item tower's title
                            encoder, shared) | 'own' (its own encoder).
  model.max_query_len       Lq, text query tokens incl. BOS/EOS.
  model.zoom_threshold      > 0: items are embedded twice, whole and cropped to the
                            cells of their attention map at or above this fraction of
                            its peak (models/zoom.py); 0: once. No parameters.
  model.zoom_refinements    n >= 0: after the zoom, n more looks, each cropped to the
                            region the previous look's attention picks inside its crop
                            (only with zoom_threshold > 0).
  data.*, train.*, loss.*, teacher.*, mesh.*, eval.*: see the comments below.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import ml_collections

from tigerfg_jax import index
from tigerfg_jax import losses
from tigerfg_jax import runpath
from tigerfg_jax.models import partitioning
from tigerfg_jax.models import towers

STAGES = ("teacher", "distill", "clip_style", "text_query")

_CLIP_MEAN = (0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255)
_CLIP_STD = (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)


@dataclasses.dataclass(frozen=True)
class Preset:
  """The sizes a preset sets; every other key has one default for all presets."""
  # Model.
  vision_variant: str           # `models.vision.decode_variant` name.
  text_variant: str             # `models.text` size name.
  patch_size: int
  num_registers: int
  max_title_len: int
  pooling_slots: int
  pooling_heads: int
  pooling_mlp_dim: int
  dtype: str                    # compute dtype (params, optimizer state, losses: float32).
  remat: str                    # `models.transformer.REMAT_POLICIES`.
  # Data.
  item_image_size: int
  query_image_size: int
  synthetic_items: int          # products in the synthetic train split.
  synthetic_eval_items: int     # items of each synthetic eval split (0: max(items // 4,
                                # min(items, 50))).
  synthetic_text_eval_items: int  # items of the eval_text split (text-query stages).
  clutter_grid: int             # cells per side of a synthetic cluttered image.
  mosaic_prob: float
  worker_count: int             # Grain worker processes (-1: from the cores).
  device_augment: bool          # query flip + colour jitter in the train step.
  # Training.
  steps: int
  batch_size: int
  learning_rate: float


PRESETS = {
    # Unit tests: seconds on a CPU.
    "micro": Preset(
        vision_variant="mu", text_variant="mu", patch_size=8, num_registers=0,
        max_title_len=16, pooling_slots=2, pooling_heads=2, pooling_mlp_dim=64,
        dtype="float32", remat="none", item_image_size=32, query_image_size=32,
        synthetic_items=48, synthetic_eval_items=0, synthetic_text_eval_items=96,
        clutter_grid=2, mosaic_prob=0.5,
        worker_count=0, device_augment=False, steps=6, batch_size=8, learning_rate=1e-3),
    # The CPU default: minutes. Mosaic is rare at 64 px: a 2x2 tile halves a product
    # to a few patches, and at 0.5 eval_normal R@1 fell by 13 points. 2 clutter cells
    # keep a target at 3-4 patches a side, as 0.3 of a 224 px image is at 16 px patches.
    "tiny": Preset(
        vision_variant="pico", text_variant="pico", patch_size=8, num_registers=4,
        max_title_len=16, pooling_slots=4, pooling_heads=4, pooling_mlp_dim=192,
        dtype="float32", remat="none", item_image_size=64, query_image_size=64,
        synthetic_items=3200, synthetic_eval_items=200,
        synthetic_text_eval_items=2000, clutter_grid=2, mosaic_prob=0.1,
        worker_count=0, device_augment=False, steps=300, batch_size=32, learning_rate=1e-3),
    # The paper's ViT-B/16 query tower, for accelerators. remat 'full': the zoomed
    # distill step fits a v5e chip's 16 GiB at 128 examples (14.5 GiB), with 'dots' it
    # does not (docs/accelerators.md); on larger devices 'dots' recomputes less.
    "b16": Preset(
        vision_variant="B/16", text_variant="S", patch_size=16, num_registers=4,
        max_title_len=32, pooling_slots=8, pooling_heads=8, pooling_mlp_dim=1024,
        dtype="bfloat16", remat="full", item_image_size=224, query_image_size=224,
        synthetic_items=4000, synthetic_eval_items=0,
        synthetic_text_eval_items=10_000, clutter_grid=3, mosaic_prob=0.5,
        worker_count=-1, device_augment=True, steps=20_000, batch_size=1024, learning_rate=5e-4),
}


def _model_config(p: Preset) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vision_variant=p.vision_variant,
      patch_size=p.patch_size,
      posemb_grid=p.item_image_size // p.patch_size,
      num_registers=p.num_registers,
      text_variant=p.text_variant,
      vocab_size=0,
      max_title_len=p.max_title_len,
      embed_dim=256,
      pooling_slots=p.pooling_slots,
      pooling_heads=p.pooling_heads,
      pooling_mlp_dim=p.pooling_mlp_dim,
      mode="tiger",
      share_vision=True,
      query_pool="cls",
      dtype=p.dtype,
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
      attention="dot_product",
      remat=p.remat,
      item_fusion="tiger",
      text_query_encoder="none",
      max_query_len=p.max_title_len,
      zoom_threshold=0.0,
      zoom_refinements=0,
  ))


def _data_config(p: Preset) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      # Dataset folder (docs/DATA.md). None: write the synthetic catalog to
      # WORKDIR/data and use it.
      root=ml_collections.FieldReference(None, field_type=str),
      # Where ingestion writes the ArrayRecord cache. None: <root>/.cache; set it when
      # the dataset folder is read-only.
      cache_dir=ml_collections.FieldReference(None, field_type=str),
      synthetic_items=p.synthetic_items,
      synthetic_eval_items=p.synthetic_eval_items,
      # > 0: also an `eval_text` split of this many items for typed queries (set by the
      # text_query stage and configs/joint.py; data/synthetic.py).
      synthetic_text_eval_items=0,
      # Cluttered images: a grid x grid layout, one product per cell.
      synthetic_clutter_grid=p.clutter_grid,
      synthetic_seed=0,
      synthetic_image_size=max(p.item_image_size, 64),
      item_image_size=p.item_image_size,
      query_image_size=p.query_image_size,
      # Expected fraction of training examples on a Mosaic canvas: products cut from
      # their boxes pasted on a random background, 2..mosaic_max_products per canvas.
      mosaic_prob=p.mosaic_prob,
      mosaic_max_products=4,
      skip_bad=False,               # skip invalid records (counted) instead of failing.
      # Grain worker processes building training examples: 0 = threads of the training
      # process; -1 = the cores this process may use less 2 (pipeline.worker_count).
      worker_count=p.worker_count,
      # True: the train step flips and colour-jitters the queries on the accelerator
      # (data/device_augment.py); the input pipeline only crops them.
      device_augment=p.device_augment,
      vocab_size=512,               # size of the tokenizer trained on train titles.
      tokenizer=ml_collections.FieldReference(None, field_type=str),  # user vocab file.
  ))


def _train_config(steps: int, p: Preset) -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict(dict(
      steps=steps,
      batch_size=p.batch_size,      # global batch, divisible by the 'data' mesh axis.
      learning_rate=p.learning_rate,
      warmup_steps=0,               # the cadence keys are set by `set_steps`.
      weight_decay=0.05,
      grad_clip_norm=1.0,
      log_every=0,
      checkpoint_every=0,
      keep_checkpoints=2,
  ))
  return set_steps(train, steps)


def set_steps(train: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """`config.train` with `steps` and the keys that scale with it: warmup over the
  first 5%, 30 log lines, 4 checkpoints. Returns `train`."""
  train.update(steps=steps, warmup_steps=max(1, steps // 20), log_every=max(1, steps // 30),
               checkpoint_every=max(1, steps // 4))
  return train


def _loss_config() -> ml_collections.ConfigDict:
  # Each term's weight (docs/ARCHITECTURE.md "Losses"); a term whose weight is 0 is not
  # computed. The stage configs below turn them on.
  return ml_collections.ConfigDict(dict(
      w_q2i=1.0,                    # query-item InfoNCE (+ title-swap hard negatives).
      w_v2t=0.0,                    # region-text InfoNCE: pooled region vs title.
      v2t_query=False,              # L_v2t also aligns the query (a photo of the target
                                    # region) with its item's title.
      w_i2v=0.0,                    # item vs the privileged teacher's target region.
      w_sdd=0.0,                    # similarity-distribution KL vs the teacher.
      w_srd=0.0,                    # spatial-relation KL vs a frozen patch teacher.
      w_spatial_map=0.0,            # the student's attention map vs the target region.
      w_t2i=0.0,                    # text query vs item InfoNCE (text_queries.jsonl).
      w_t2modal=0.0,                # text query vs the item's text / image / multimodal
                                    # embeddings ('beyond_text' and 'smar' fusions).
      hard_negatives=0,             # K titles each item is re-pooled under (q2i, i2v).
      spatial_target="box",         # 'box' (box mask on the patch grid) | 'teacher'.
      kd_temperature=1.0,           # T of the similarity KL.
      srd_temperature=0.1,          # softmax temperature of the patch relations.
  ))


def experiment_config(stage: str, preset: str | None) -> ml_collections.ConfigDict:
  """Returns the full config of `stage` at `preset` (default 'tiny')."""
  preset = preset or "tiny"
  if preset not in PRESETS:
    raise ValueError(f"unknown preset {preset!r}; expected one of {tuple(PRESETS)}")
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.stage = stage
  config.preset = preset
  config.model = _model_config(PRESETS[preset])
  config.data = _data_config(PRESETS[preset])
  # Equal compute: the baseline takes as many optimisation steps as the distill
  # stage's teacher and student together.
  steps = PRESETS[preset].steps * (2 if stage == "clip_style" else 1)
  config.train = _train_config(steps, PRESETS[preset])
  config.loss = _loss_config()
  # Teacher for distillation: a checkpoint directory written by a `teacher` run. None
  # in the `distill` stage: train it first in WORKDIR/teacher.
  config.teacher = ml_collections.ConfigDict(dict(
      checkpoint=ml_collections.FieldReference(None, field_type=str),
      # Start the student from the teacher's weights (stage 2 continues stage 1; the
      # teacher needs the student's config.model). The text_query stage copies the
      # parameters its item fusion shares with the teacher (ViT, title encoder).
      init_student=False,
      # The frozen patch teacher of L_SRD: a folder written by `python -m
      # tigerfg_jax.convert --format=dinov2`. None: the teacher's own ViT.
      patch_teacher=ml_collections.FieldReference(None, field_type=str),
      # The teacher stage's model: these sizes instead of the student's (None: the
      # same). A larger teacher cannot initialise the student (init_student=False).
      vision_variant=ml_collections.FieldReference(None, field_type=str),
      text_variant=ml_collections.FieldReference(None, field_type=str),
  ))
  config.mesh = ml_collections.ConfigDict(dict(
      data=-1,                      # -1: all devices not used by 'model'.
      model=1,
      param_sharding="replicated",  # 'replicated' | 'fsdp' | 'tensor'.
  ))
  config.eval = ml_collections.ConfigDict(dict(
      backend="scann",              # 'scann' | 'exact' | 'approx'.
      batch_size=64,                # rows per embedding call, divisible by 'data'.
  ))
  # Evaluators (`evaluation.evaluators`): each runs every `every` steps (0: never
  # during training) and, with `at_end`, after the last step.
  config.evals = ml_collections.ConfigDict(dict(
      retrieval=dict(every=0, at_end=True),   # R@k, mAP@10 of every eval* split.
      box_oracle=dict(every=0, at_end=False),  # deployed vs true-box pooling (tiger).
  ))
  if stage == "teacher":
    config.loss.w_v2t = 0.25
    config.loss.hard_negatives = 3
    # Stage 1 also learns where the title points: its attention on the whole item
    # image (one more look; its retrieval reads the crop) follows the box, so the
    # student starts grounded (docs/results.md).
    config.loss.w_spatial_map = 4.0
  if stage == "distill":
    # The student looks three times (models/zoom.py): the whole image, the region its
    # attention picks, and the region the crop's own attention picks inside it. Its
    # attention map is also a box: the spatial map weighs 4 (0.5 before the zoom;
    # docs/results.md).
    config.loss.update(w_v2t=0.25, w_i2v=0.5, w_sdd=1.0, w_srd=0.5, w_spatial_map=4.0,
                       hard_negatives=3, v2t_query=True)
    config.model.update(zoom_threshold=0.2, zoom_refinements=1)
    config.teacher.init_student = True
  if stage == "clip_style":
    config.model.mode = "clip_style"
    config.data.mosaic_prob = 0.0
  if stage == "text_query":
    config.data.synthetic_text_eval_items = PRESETS[preset].synthetic_text_eval_items
    config.loss.update(w_q2i=0.0, w_t2i=1.0, w_t2modal=0.5)
    config.model.update(item_fusion=TEXT_QUERY_FUSION, text_query_encoder="own")
    # Beyond Text's first stage: the encoders start domain-trained, from the privileged
    # teacher (image queries on this catalog; trained first in WORKDIR/teacher).
    config.teacher.init_student = True
    config.data.mosaic_prob = 0.0
  return config


# The text_query stage's default item side: the best multimodal fusion measured
# (docs/results_text_queries.md).
TEXT_QUERY_FUSION = "smar"


# Allowed values of the keys with a fixed set, owned by the modules that read them.
_CHOICES = {
    **{f"model.{key}": allowed for key, allowed in towers.CHOICES.items()},
    "loss.spatial_target": losses.SPATIAL_TARGETS,
    "mesh.param_sharding": partitioning.PARAM_SHARDINGS,
    "eval.backend": tuple(index.BACKENDS),
}


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys in place (`{'train.steps': 3}`) and returns `config`.

  Raises:
    KeyError: naming the override whose section or key the config does not have.
  """
  for dotted, value in overrides.items():
    node = config
    *parents, leaf = dotted.split(".")
    for part in parents:
      if part not in node:
        raise KeyError(f"override {dotted!r}: the config has no section {part!r}")
      node = node[part]
    if leaf not in node:
      raise KeyError(f"override {dotted!r}: the config has no key {leaf!r}")
    node[leaf] = value
  return config


# Keys a resumed run may change (its length, logging and evaluation cadence); any other
# key says what the run is (model, data, optimizer, seed, stage) and must not change.
RESUMABLE_KEYS = ("train.steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "eval.batch_size", "eval.backend", "evals.")


def changed_keys(old: ml_collections.ConfigDict,
                 new: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """`{dotted key: (old value, new value)}` for every key whose value differs."""
  old_flat, new_flat = _flat_items(old), _flat_items(new)
  return {key: (old_flat.get(key), new_flat.get(key))
          for key in sorted(old_flat.keys() | new_flat.keys())
          if _comparable(old_flat.get(key)) != _comparable(new_flat.get(key))}


def is_resumable_change(key: str) -> bool:
  return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def _comparable(value: Any) -> Any:
  return list(value) if isinstance(value, (tuple, list)) else value


def _flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  items = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      items.update(_flat_items(value, f"{prefix}{key}."))
    else:
      items[f"{prefix}{key}"] = value
  return items


def _flat_keys(config: ml_collections.ConfigDict) -> set[str]:
  return set(_flat_items(config))


def _get(config: ml_collections.ConfigDict, dotted: str):
  for part in dotted.split("."):
    config = config[part]
  return config


def _text_query_problems(config: ml_collections.ConfigDict) -> list[str]:
  """What stops `config` from training its query kinds with its item side."""
  model, loss = config.model, config.loss
  text_terms = [f"loss.w_{t}" for t in ("t2i", "t2modal") if loss[f"w_{t}"] > 0]
  image_terms = [f"loss.w_{t}" for t in ("q2i", "v2t", "i2v", "sdd", "srd", "spatial_map")
                 if loss[f"w_{t}"] > 0]
  problems = []
  if text_terms and model.text_query_encoder == "none":
    problems.append(f"config.{text_terms[0]} > 0 needs a text query tower: set "
                    "config.model.text_query_encoder to 'own' or 'title'")
  if config.stage == "text_query":
    if not text_terms:
      problems.append("config.stage='text_query' trains text queries: set "
                      "config.loss.w_t2i > 0")
    if image_terms:
      problems.append(f"config.stage='text_query' trains text queries only: "
                      f"{', '.join('config.' + t for t in image_terms)} must be 0 (for "
                      "both query kinds, train configs/joint.py)")
  elif model.item_fusion != "tiger":
    problems.append(f"config.model.item_fusion={model.item_fusion!r}: the "
                    f"{config.stage!r} stage trains image queries, which need the TIGER-FG "
                    "item tower ('tiger'; config.model.mode picks its pooling)")
  if (model.text_query_encoder == "title"
      and model.max_query_len > model.max_title_len):
    problems.append(f"config.model.max_query_len={model.max_query_len} > max_title_len="
                    f"{model.max_title_len}: text_query_encoder='title' reuses the title "
                    "encoder, whose positions stop there")
  if model.text_query_encoder == "title" and model.item_fusion == "image":
    problems.append("config.model.text_query_encoder='title' reuses the item tower's title "
                    "encoder, and item_fusion='image' has none: use 'own'")
  return problems


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming every bad key before any work is done."""
  if config.get("stage") not in STAGES or config.get("preset") not in PRESETS:
    raise ValueError(f"config.stage={config.get('stage')!r} / config.preset="
                     f"{config.get('preset')!r}: expected a stage in {STAGES} and a "
                     f"preset in {tuple(PRESETS)}")
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
  for key in [k for k in config.loss if k.startswith("w_")]:
    if config.loss[key] < 0:
      problems.append(f"config.loss.{key}={config.loss[key]}: weights must be >= 0")
  problems += _text_query_problems(config)
  if (config.stage == "teacher" and config.loss.w_spatial_map > 0
      and config.loss.spatial_target == "teacher"):
    problems.append("config.loss.spatial_target='teacher': the teacher stage has no "
                    "teacher to take a map from; its spatial map follows the box ('box')")
  if not 0 <= config.loss.hard_negatives < config.train.batch_size:
    problems.append(f"config.loss.hard_negatives={config.loss.hard_negatives}: expected "
                    f"0 <= K < train.batch_size={config.train.batch_size}")
  for key in ("loss.kd_temperature", "loss.srd_temperature"):
    if _get(config, key) <= 0:
      problems.append(f"config.{key}={_get(config, key)}: expected > 0")
  for key in ("model.posemb_grid", "train.steps", "train.batch_size", "train.log_every",
              "train.checkpoint_every", "train.keep_checkpoints", "eval.batch_size"):
    if _get(config, key) < 1:
      problems.append(f"config.{key}={_get(config, key)}: expected a positive integer")
  for name, settings in config.evals.items():
    if settings.every < 0:
      problems.append(f"config.evals.{name}.every={settings.every}: expected >= 0 "
                      "(0: not during training)")
  for key in ("data.item_image_size", "data.query_image_size"):
    if _get(config, key) % config.model.patch_size:
      problems.append(f"config.{key}={_get(config, key)} is not a multiple of "
                      f"config.model.patch_size={config.model.patch_size}")
  if config.data.worker_count < -1:
    problems.append(f"config.data.worker_count={config.data.worker_count}: expected -1 "
                    "(from the cores) or >= 0")
  if not 0 <= config.data.mosaic_prob <= 1:
    problems.append(f"config.data.mosaic_prob={config.data.mosaic_prob}: expected [0, 1]")
  if config.data.mosaic_max_products < 2:
    problems.append(f"config.data.mosaic_max_products={config.data.mosaic_max_products}: "
                    "expected >= 2 (a target and at least one distractor)")
  if runpath.is_url(config.data.root):
    problems.append(f"config.data.root={config.data.root!r}: dataset folders are local "
                    "(copy or mount it; only run folders may be gs:// URLs)")
  elif config.data.root and not os.path.isdir(config.data.root):
    problems.append(f"config.data.root={config.data.root!r}: no such directory")
  if config.teacher.init_student and (config.teacher.vision_variant
                                      or config.teacher.text_variant):
    problems.append("config.teacher.vision_variant / text_variant give the teacher other "
                    "sizes than the student, so it cannot initialise it: set "
                    "--config.teacher.init_student=false")
  patch_teacher = config.teacher.patch_teacher
  if patch_teacher and not os.path.isdir(patch_teacher):
    problems.append(f"config.teacher.patch_teacher={patch_teacher!r}: no such directory "
                    "(expected a folder written by `python -m tigerfg_jax.convert "
                    "--format=dinov2`)")
  teacher = config.teacher.checkpoint
  if teacher and not any(runpath.exists(teacher, name, what="config.teacher.checkpoint")
                         for name in ("checkpoints", "init_params")):
    problems.append(f"config.teacher.checkpoint={teacher!r}: expected the workdir of a "
                    "teacher run (with checkpoints/ or init_params/, and config.json)")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))
