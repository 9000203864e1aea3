"""FLOPs of one train step, counted from the config alone, and model FLOPs utilisation.

Convention (as MaxText's): matrix multiplications only, 2 FLOPs per multiply-add
(`2 * m * n * k`); attention counts its projections and both of its batched matmuls
(`Q K^T` and `A V`); normalisation, activations, softmax, the loss's elementwise work
and the optimizer are ignored. Training a matmul costs 3x its forward (the forward,
the gradient of its input and the gradient of its weight), except the patch embedding,
whose input is the image: no input gradient, 2x. The frozen teacher's forward is counted
once. The in-batch similarity logits (`q @ i.T`, `[B, E] x [E, B]`) are counted too.

XLA's `cost_analysis()["flops"]` also counts elementwise work (one FLOP per element of
an add, a multiply, ...), so it is a little above this count: most at small widths.
"""

from __future__ import annotations

import ml_collections

from tigerfg_jax.models import text, vision
from tigerfg_jax.training import step as step_lib

# Dense bf16 peak of one device in TFLOP/s, by a substring of `jax.Device.device_kind`
# (NVIDIA: SXM, no sparsity). `peak_tflops` tries the longest key first ("TPU v5 lite"
# is v5e, plain "TPU v5" is v5p).
PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
}


def peak_tflops(device_kind: str) -> float | None:
  """The bf16 peak of a device kind (`PEAK_BF16_TFLOPS`), None where unknown (CPU)."""
  for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
    if key in device_kind:
      return PEAK_BF16_TFLOPS[key]
  return None


def mfu(flops_per_step: float, step_seconds: float, device_kind: str,
        num_devices: int) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' bf16 peak, in [0, 1]
  for a real measurement; None where the peak of `device_kind` is unknown."""
  peak = peak_tflops(device_kind)
  if peak is None:
    return None
  if step_seconds <= 0 or num_devices < 1:
    raise ValueError(f"mfu: step_seconds={step_seconds} must be > 0 and "
                     f"num_devices={num_devices} >= 1")
  return flops_per_step / step_seconds / (peak * 1e12 * num_devices)


def _attention(queries: int, keys: int, width: int, key_width: int) -> int:
  """Forward FLOPs of one `MultiHeadAttention` for one example: `queries` rows of
  `width` attending over `keys` rows of `key_width` (projections, QK^T, AV, out)."""
  return _key_values(keys, width, key_width) + _attention_queries(queries, keys, width)


def _key_values(keys: int, width: int, key_width: int) -> int:
  """The key and value projections of an attention (once per set of keys)."""
  return 2 * 2 * keys * key_width * width


def _attention_queries(queries: int, keys: int, width: int) -> int:
  """The query projection, QK^T, AV and the output projection of `queries` rows."""
  return 2 * queries * width * width + 2 * 2 * queries * keys * width + 2 * queries * width * width


def _mlp(rows: int, width: int, hidden: int) -> int:
  return 2 * 2 * rows * width * hidden


def _encoder(tokens: int, width: int, depth: int, mlp_dim: int) -> int:
  """Forward FLOPs of `depth` pre-LN transformer blocks over `tokens` tokens."""
  return depth * (_attention(tokens, tokens, width, width) + _mlp(tokens, width, mlp_dim))


def _map_head(tokens: int, width: int, mlp_dim: int) -> int:
  """`pooling.MAPHead`: one probe attends over `tokens`, then a residual MLP."""
  return _attention(1, tokens, width, width) + _mlp(1, width, mlp_dim)


def _vit(model: ml_collections.ConfigDict, image_size: int) -> tuple[int, int, int]:
  """(patch-embedding FLOPs, encoder FLOPs, patches) of the ViT on one image."""
  size = vision.decode_variant(model.vision_variant)
  patches = (image_size // model.patch_size) ** 2
  embed = 2 * patches * model.patch_size**2 * 3 * size["width"]
  tokens = 1 + model.num_registers + patches
  return embed, _encoder(tokens, size["width"], size["depth"], size["mlp_dim"]), patches


def _query_head(model: ml_collections.ConfigDict, patches: int) -> int:
  width = vision.decode_variant(model.vision_variant)["width"]
  pooled = (0 if model.query_pool == "cls"
            else _map_head(patches, width, model.pooling_mlp_dim))
  return pooled + 2 * width * model.embed_dim


def _title_pool(model: ml_collections.ConfigDict) -> tuple[int, int]:
  """(FLOPs, width) of the pooled title: the mean over its tokens and the projection."""
  size = text.decode_text_variant(model.text_variant)
  total = 2 * model.max_title_len * size["width"] if model.text_pool == "mean" else 0
  return (total + 2 * size["width"] * model.text_proj_dim,
          model.text_proj_dim or size["width"])


def _title_reading(model: ml_collections.ConfigDict) -> int:
  """The text-guided pooling's slots reading one title (0 in 'clip_style')."""
  if model.mode == "clip_style":
    return 0
  width = vision.decode_variant(model.vision_variant)["width"]
  text_width = text.decode_text_variant(model.text_variant)["width"]
  return _attention(model.pooling_slots, model.max_title_len, width, text_width)


def _pooling(model: ml_collections.ConfigDict, patches: int, titles: int = 1) -> int:
  """The item pooling, merge and projection on one example (title already encoded),
  under `titles` titles (its own and the title-swap partners'): what depends on the
  title runs per title, the patches' keys and values are projected once."""
  width = vision.decode_variant(model.vision_variant)["width"]
  slots, hidden = model.pooling_slots, model.pooling_mlp_dim
  projection = 2 * (width + _title_pool(model)[1]) * model.embed_dim
  if model.mode == "clip_style":  # the MAP head ignores the title: it runs once.
    return _map_head(patches, width, hidden) + titles * projection
  total = 2 * _key_values(patches, width, width)  # the two attentions over the patches.
  per_title = _title_reading(model)
  per_title += _attention_queries(slots, patches, width)  # slots read the patches.
  per_title += _mlp(slots, width, hidden)
  per_title += 2 * slots * width * hidden + 2 * slots * hidden  # slot scores.
  per_title += 2 * slots * width  # f_m: the slot-weighted sum.
  per_title += _mlp(1, width, hidden)  # appearance query.
  per_title += _attention_queries(1, patches, width)  # f_a over the patches.
  per_title += _mlp(1, width, hidden)  # merge MLP.
  return total + titles * (per_title + 2 * width * model.embed_dim)


def _attention_map(model: ml_collections.ConfigDict, patches: int) -> int:
  """The item pooling on one example up to its attention map over the patches, under
  the own title (already read by the slots): what a zoom refinement's look needs. The
  map's attention projects keys but no values and mixes nothing."""
  width = vision.decode_variant(model.vision_variant)["width"]
  hidden = model.pooling_mlp_dim
  keys_and_map = 2 * patches * width * width + 2 * 2 * patches * width
  if model.mode == "clip_style":  # the MAP head's probe query and logits.
    return 2 * width * width + keys_and_map
  slots = model.pooling_slots
  total = _key_values(patches, width, width) + _attention_queries(slots, patches, width)
  total += _mlp(slots, width, hidden) + 2 * slots * width * hidden + 2 * slots * hidden
  total += 2 * slots * width + _mlp(1, width, hidden)  # f_m and the appearance query.
  return total + 2 * width * width + keys_and_map


def _item_head(model: ml_collections.ConfigDict, patches: int, v2t: bool = False) -> int:
  """Title encoder, pooling, merge and projection of the item tower on one example;
  with `v2t` also the region and title projections of L_v2t (otherwise unused)."""
  size = text.decode_text_variant(model.text_variant)
  total = _encoder(model.max_title_len, size["width"], size["depth"], size["mlp_dim"])
  title_pool, title_width = _title_pool(model)
  if model.mode == "clip_style" or v2t:
    total += title_pool  # 'tiger' reads the pooled title only for L_v2t.
  if v2t:
    width = vision.decode_variant(model.vision_variant)["width"]
    total += 2 * (width + title_width) * model.embed_dim
  return total + _pooling(model, patches)


def forward_flops(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Forward matmul FLOPs of the model on one global batch (one look at each item:
  `model.zoom_threshold` is not counted here, `train_step_flops` counts it), split into
  `patch_embed` (no input gradient) and `rest`; `logits` is one `[B, B]` similarity."""
  model, data = config.model, config.data
  batch = config.train.batch_size
  query_embed, query_vit, query_patches = _vit(model, data.query_image_size)
  item_embed, item_vit, item_patches = _vit(model, data.item_image_size)
  rest = (query_vit + _query_head(model, query_patches)
          + item_vit + _item_head(model, item_patches))
  return dict(patch_embed=batch * (query_embed + item_embed), rest=batch * rest,
              logits=2 * batch * batch * model.embed_dim)


def train_step_flops(config: ml_collections.ConfigDict,
                     teacher_config: ml_collections.ConfigDict | None = None,
                     patch_teacher: bool = False) -> int:
  """Matmul FLOPs of one update step of `config.stage` over the global batch.

  Counts what the step's active loss terms run (`training.step`): the student with
  its title-swap re-poolings and L_v2t heads, the similarities of q2i / v2t / i2v /
  sdd, the hard-negative scores, the patch relations of L_SRD, and the frozen
  teacher's passes (`step.teacher_views`). A similarity against a frozen side costs
  2x its forward (no gradient for the frozen operand).

  Args:
    config: an experiment config (`config_lib.experiment_config`).
    teacher_config: the teacher's config (its `model`) when the stage loads one.
    patch_teacher: L_SRD reads a separate patch teacher (not counted: its size is
      in its own folder), not the teacher's ViT.
  """
  model, data, loss = config.model, config.data, config.loss
  batch, embed, swaps = config.train.batch_size, model.embed_dim, loss.hard_negatives
  terms = step_lib.active_terms(loss)
  query_embed, query_vit, query_patches = _vit(model, data.query_image_size)
  item_embed, item_vit, patches = _vit(model, data.item_image_size)
  # `model.zoom_threshold`: a second look (ViT and pooling under every title) at the
  # crop; the titles are encoded and read by the slots once. Each of
  # `model.zoom_refinements` looks before it runs forward only (its box is a choice,
  # not a path for gradients) and up to the own title's attention map.
  looks = 2 if model.zoom_threshold else 1
  refinements = model.zoom_refinements if model.zoom_threshold else 0
  second_look = (item_vit + _pooling(model, patches, 1 + swaps)
                 - (1 + swaps) * _title_reading(model))
  student = batch * (query_vit + _query_head(model, query_patches) + item_vit
                     + _item_head(model, patches, v2t="v2t" in terms)
                     + _pooling(model, patches, 1 + swaps) - _pooling(model, patches)
                     + (looks - 1) * second_look)
  logits, hard = 2 * batch * batch * embed, 2 * batch * swaps * embed
  width = vision.decode_variant(model.vision_variant)["width"]
  student += sum(logits for t in ("q2i", "v2t", "sdd") if t in terms)
  student += logits if "v2t" in terms and loss.v2t_query else 0
  student += hard if "q2i" in terms else 0
  student += 2 * batch * patches * patches * width if "srd" in terms else 0
  total = 2 * batch * (query_embed + looks * item_embed) + 3 * student
  total += refinements * batch * (item_embed + item_vit + _attention_map(model, patches))
  total += 2 * (logits + hard) if "i2v" in terms else 0
  if config.stage == "teacher" and "spatial_map" in terms:
    # The item image's look whose attention map follows the box (`step.make_loss_fn`),
    # trained up to the map: the title encoded and read again, no values, no merge.
    size = text.decode_text_variant(model.text_variant)
    title = _encoder(model.max_title_len, size["width"], size["depth"], size["mlp_dim"])
    total += batch * (2 * item_embed + 3 * (item_vit + title + _title_reading(model)
                                            + _attention_map(model, patches)))
  if teacher_config is None or config.stage != "distill":
    return total
  t_model = teacher_config.model
  t_query_embed, t_query_vit, _ = _vit(t_model, data.query_image_size)
  t_item_embed, t_item_vit, _ = _vit(t_model, data.item_image_size)
  t_item = t_item_embed + t_item_vit
  views = step_lib.teacher_views(loss, patch_teacher)
  if views["crop"]:
    total += batch * (t_item + _item_head(t_model, patches))
    if "sdd" in terms:
      total += batch * (t_query_embed + t_query_vit + _query_head(t_model, query_patches))
      total += logits
  if views["full"]:
    total += batch * t_item
    if loss.spatial_target == "teacher" and "spatial_map" in terms:
      # An upper bound: only the pooling's attention map is read.
      total += batch * _item_head(t_model, patches)
    if "srd" in terms:
      t_width = vision.decode_variant(t_model.vision_variant)["width"]
      total += 2 * batch * patches * patches * t_width
  return total
