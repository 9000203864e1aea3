"""Where each tensor of a CLIP checkpoint goes in the tigerfg_jax parameter tree.

Works on a flat state dict `{name: np.ndarray}` already read from disk (`convert.py`
reads the files). Two source layouts:

- Hugging Face `CLIPModel` (`vision_model.*`, `text_model.*`, `visual_projection.weight`,
  `text_projection.weight`, `logit_scale`): the canonical layout here.
- open_clip / OpenAI ViT CLIP (`visual.conv1.weight`, `visual.transformer.resblocks.N.
  attn.in_proj_weight`, `transformer.resblocks.N...`, `ln_final`, `text_projection`):
  renamed into the Hugging Face layout first (fused q/k/v split, `x @ proj` matrices
  transposed to `nn.Linear` weights), so one table maps both. open_clip's ResNet
  towers and custom (Hugging Face) text towers are not supported.

Layout facts the mapping relies on (PyTorch side -> ours):
- `nn.Linear.weight` is `[out, in]`; a Flax Dense kernel is `[in, out]`; our attention
  kernels split the width into heads: query/key/value `[D, H, D/H]`, out `[H, D/H, D]`.
- The patch embedding conv `[D, 3, p, p]` becomes a Flax conv kernel `[p, p, 3, D]`;
  CLIP's conv has no bias (ours gets zeros).
- CLIP's vision position table has 1 + N rows (CLS first). Our ViT positions cover the
  patches only; CLS enters the pre-LN as `class_embedding + position[0]`, which is
  exactly our `cls` parameter.
- CLIP's text position table has `max_position_embeddings` rows; ours keeps the first
  `max_title_len`.
- The projections have no bias; ours (when it has one) gets zeros.
- Our attention has no key bias, and CLIP's (`k_proj.bias`) is dropped: it adds
  `q . b_k` to every logit of a query `q`, the same for every key, so the softmax over
  the keys (masked or not) ignores it. Dropping it changes no output.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping

import numpy as np

HUGGINGFACE = "huggingface"
OPEN_CLIP = "open_clip"

# One tensor of each part of the model: the part is in the checkpoint iff it is.
VISION_ANCHOR = "vision_model.embeddings.patch_embedding.weight"
TEXT_ANCHOR = "text_model.embeddings.token_embedding.weight"
VISUAL_PROJECTION = "visual_projection.weight"
TEXT_PROJECTION = "text_projection.weight"
VISION_PRE_NORM = "vision_model.pre_layrnorm.weight"


class ConversionError(ValueError):
  """The checkpoint does not fit the configured model (names the tensor and shapes)."""


# ------------------------------------------------------------- open_clip -> HF ---

_OPEN_CLIP_RENAMES = (
    (r"^visual\.conv1\.weight$", "vision_model.embeddings.patch_embedding.weight"),
    (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
    (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
    (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
    (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
    (r"^visual\.transformer\.resblocks\.(\d+)\.", r"vision_model.encoder.layers.\1."),
    (r"^token_embedding\.weight$", "text_model.embeddings.token_embedding.weight"),
    (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
    (r"^transformer\.resblocks\.(\d+)\.", r"text_model.encoder.layers.\1."),
    (r"^ln_final\.", "text_model.final_layer_norm."),
)
_OPEN_CLIP_BLOCK_RENAMES = (
    (".ln_1.", ".layer_norm1."), (".ln_2.", ".layer_norm2."),
    (".attn.out_proj.", ".self_attn.out_proj."),
    (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
)


def detect_layout(state: Mapping[str, np.ndarray], source: str) -> str:
  """HUGGINGFACE or OPEN_CLIP; ConversionError naming a few keys otherwise."""
  if VISION_ANCHOR in state or TEXT_ANCHOR in state:
    return HUGGINGFACE
  if "visual.conv1.weight" in state:
    if not any(name.startswith("visual.transformer.resblocks.") for name in state):
      raise ConversionError(f"{source}: an open_clip checkpoint without ViT blocks "
                        "(a ResNet CLIP?); only ViT CLIP models are supported")
    return OPEN_CLIP
  shown = ", ".join(sorted(state)[:6])
  raise ConversionError(
      f"{source}: not a CLIP checkpoint in a supported layout. Expected Hugging Face "
      f"CLIPModel names ({VISION_ANCHOR!r}, ...) or open_clip ViT names "
      f"('visual.conv1.weight', ...); found {len(state)} tensors: {shown}, ...")


def open_clip_to_huggingface(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames an open_clip ViT state dict into the Hugging Face CLIPModel layout.

  Tensors with no Hugging Face counterpart (e.g. `attn_mask`) keep their names, so
  they are reported as unused.
  """
  out = {}
  for name, value in state.items():
    if name == "visual.proj":
      out[VISUAL_PROJECTION] = value.T
      continue
    if name == "text_projection":
      out[TEXT_PROJECTION] = value.T
      continue
    renamed = name
    for pattern, replacement in _OPEN_CLIP_RENAMES:
      renamed = re.sub(pattern, replacement, renamed)
    if ".encoder.layers." in renamed:
      for old, new in _OPEN_CLIP_BLOCK_RENAMES:
        renamed = renamed.replace(old, new)
      fused = re.match(r"^(.*)\.attn\.in_proj_(weight|bias)$", renamed)
      if fused:
        prefix, kind = fused.groups()
        for part, chunk in zip(("q", "k", "v"), np.split(value, 3, axis=0)):
          out[f"{prefix}.self_attn.{part}_proj.{kind}"] = chunk
        continue
    out[renamed] = value
  return out


def to_huggingface(state: Mapping[str, np.ndarray],
                   source: str) -> tuple[str, dict[str, np.ndarray]]:
  """`(layout, state in the Hugging Face layout)`."""
  layout = detect_layout(state, source)
  if layout == OPEN_CLIP:
    return layout, open_clip_to_huggingface(state)
  return layout, dict(state)


def num_layers(state: Mapping[str, np.ndarray], tower: str) -> int:
  """Blocks of `tower` ('vision_model' | 'text_model') in a Hugging Face state dict."""
  pattern = re.compile(rf"^{tower}\.encoder\.layers\.(\d+)\.")
  indices = [int(m.group(1)) for m in map(pattern.match, state) if m]
  return max(indices) + 1 if indices else 0


# ---------------------------------------------------------------- the mapping ---

@dataclasses.dataclass(frozen=True)
class Entry:
  """How one of our parameters is made from checkpoint tensors.

  `build(target_shape, *tensors)` returns the array in our layout or raises
  ConversionError via `fit_array`; `sources` are the checkpoint names it reads.
  """
  sources: tuple[str, ...]
  build: Callable[..., np.ndarray]


def fit_array(array: np.ndarray, target_shape: tuple[int, ...], merged: tuple[int, ...],
         what: str) -> np.ndarray:
  """`array` (our layout with the head axes merged) reshaped to `target_shape`.

  `merged` is `target_shape` with its head axes multiplied out; a mismatch raises
  ConversionError naming `what` and both shapes.
  """
  if tuple(array.shape) != tuple(merged):
    shown = "" if merged == target_shape else f" (= {tuple(merged)} with heads merged)"
    raise ConversionError(f"{what}: checkpoint gives {tuple(array.shape)}, model has "
                      f"{tuple(target_shape)}{shown}")
  return array.reshape(target_shape)


def copy_tensor(path: str, source: str) -> Entry:
  return Entry((source,), lambda shape, x: fit_array(x, shape, shape, f"{path} <- {source}"))


def linear_kernel(path: str, source: str) -> Entry:
  """`nn.Linear.weight` `[out, in]` -> Dense kernel `[in, out]`."""
  return Entry((source,), lambda shape, w: fit_array(w.T, shape, shape, f"{path} <- {source}"))


def head_kernel(path: str, source: str) -> Entry:
  """q/k/v weight `[D, D]` -> `[D, H, D/H]` (the target's H)."""
  def build(shape, w):
    return fit_array(w.T, shape, (shape[0], math.prod(shape[1:])), f"{path} <- {source}")
  return Entry((source,), build)


def head_bias(path: str, source: str) -> Entry:
  """q/k/v bias `[D]` -> `[H, D/H]`."""
  return Entry((source,), lambda shape, b: fit_array(b, shape, (math.prod(shape),),
                                                 f"{path} <- {source}"))


def out_kernel(path: str, source: str) -> Entry:
  """out_proj weight `[D, D]` -> `[H, D/H, D]`."""
  def build(shape, w):
    return fit_array(w.T, shape, (math.prod(shape[:-1]), shape[-1]), f"{path} <- {source}")
  return Entry((source,), build)


def zeros_entry() -> Entry:
  """A bias the checkpoint does not have: zeros keep the function CLIP computes."""
  return Entry((), lambda shape: np.zeros(shape, np.float32))


def _block(ours: str, theirs: str) -> dict[str, Entry]:
  entries = {}
  for norm_ours, norm_theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
    entries[f"{ours}/{norm_ours}/scale"] = copy_tensor(f"{ours}/{norm_ours}/scale",
                                                 f"{theirs}.{norm_theirs}.weight")
    entries[f"{ours}/{norm_ours}/bias"] = copy_tensor(f"{ours}/{norm_ours}/bias",
                                                f"{theirs}.{norm_theirs}.bias")
  for head_ours, head_theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    path = f"{ours}/attn/{head_ours}"
    entries[f"{path}/kernel"] = head_kernel(f"{path}/kernel",
                                             f"{theirs}.self_attn.{head_theirs}.weight")
    if head_ours != "key":  # The key bias is dropped (`key_biases`).
      entries[f"{path}/bias"] = head_bias(f"{path}/bias",
                                           f"{theirs}.self_attn.{head_theirs}.bias")
  entries[f"{ours}/attn/out/kernel"] = out_kernel(f"{ours}/attn/out/kernel",
                                                   f"{theirs}.self_attn.out_proj.weight")
  entries[f"{ours}/attn/out/bias"] = copy_tensor(f"{ours}/attn/out/bias",
                                           f"{theirs}.self_attn.out_proj.bias")
  for fc in ("fc1", "fc2"):
    entries[f"{ours}/mlp/{fc}/kernel"] = linear_kernel(f"{ours}/mlp/{fc}/kernel",
                                                 f"{theirs}.mlp.{fc}.weight")
    entries[f"{ours}/mlp/{fc}/bias"] = copy_tensor(f"{ours}/mlp/{fc}/bias",
                                                   f"{theirs}.mlp.{fc}.bias")
  return entries


def _norm(ours: str, theirs: str) -> dict[str, Entry]:
  return {f"{ours}/scale": copy_tensor(f"{ours}/scale", f"{theirs}.weight"),
          f"{ours}/bias": copy_tensor(f"{ours}/bias", f"{theirs}.bias")}


def vision_entries(ours: str, depth: int, pre_norm: bool) -> dict[str, Entry]:
  """Our VisionEncoder at `ours` (e.g. 'vision') from `vision_model.*`."""
  embeddings = "vision_model.embeddings"
  positions = f"{embeddings}.position_embedding.weight"

  def patch_kernel(shape, w):
    return fit_array(w.transpose(2, 3, 1, 0), shape, shape,
                f"{ours}/patch_embed/kernel <- {embeddings}.patch_embedding.weight")

  def patch_positions(shape, table):
    if table.shape[0] - 1 != shape[0]:
      raise ConversionError(
          f"{ours}/pos_embedding <- {positions}: the checkpoint has {table.shape[0] - 1} "
          f"patch positions ({_grid(table.shape[0] - 1)} grid), the model {shape[0]} "
          f"({_grid(shape[0])} grid)")
    return fit_array(table[1:], shape, shape, f"{ours}/pos_embedding <- {positions}")

  def cls(shape, class_embedding, table):
    return fit_array((class_embedding + table[0])[None], shape, shape,
                f"{ours}/cls <- {embeddings}.class_embedding + {positions}[0]")

  entries = {
      f"{ours}/patch_embed/kernel": Entry((f"{embeddings}.patch_embedding.weight",),
                                          patch_kernel),
      f"{ours}/patch_embed/bias": zeros_entry(),
      f"{ours}/pos_embedding": Entry((positions,), patch_positions),
      f"{ours}/cls": Entry((f"{embeddings}.class_embedding", positions), cls),
      **_norm(f"{ours}/encoder/norm", "vision_model.post_layernorm"),
  }
  if pre_norm:
    entries.update(_norm(f"{ours}/pre_norm", "vision_model.pre_layrnorm"))
  for i in range(depth):
    entries.update(_block(f"{ours}/encoder/block_{i}", f"vision_model.encoder.layers.{i}"))
  return entries


def text_entries(ours: str, depth: int) -> dict[str, Entry]:
  """Our TextEncoder at `ours` from `text_model.*` (without its projection)."""
  positions = "text_model.embeddings.position_embedding.weight"

  def leading_positions(shape, table):
    if table.shape[0] < shape[0]:
      raise ConversionError(f"{ours}/pos_embedding <- {positions}: the checkpoint has "
                        f"{table.shape[0]} text positions, fewer than "
                        f"model.max_title_len={shape[0]}")
    return fit_array(table[:shape[0]], shape, shape, f"{ours}/pos_embedding <- {positions}")

  entries = {
      f"{ours}/token_embed/embedding": copy_tensor(f"{ours}/token_embed/embedding", TEXT_ANCHOR),
      f"{ours}/pos_embedding": Entry((positions,), leading_positions),
      **_norm(f"{ours}/encoder/norm", "text_model.final_layer_norm"),
  }
  for i in range(depth):
    entries.update(_block(f"{ours}/encoder/block_{i}", f"text_model.encoder.layers.{i}"))
  return entries


def key_biases(state: Mapping[str, np.ndarray], tower: str) -> list[str]:
  """The attention key biases of `tower` ('vision_model' | 'text_model') in `state`.

  They have no counterpart in our attention and are dropped exactly: a key bias adds
  the same logit to every key of a query, which the softmax ignores.
  """
  names = (f"{tower}.encoder.layers.{i}.self_attn.k_proj.bias"
           for i in range(num_layers(state, tower)))
  return [name for name in names if name in state]


def projection_entries(ours: str, source: str, has_bias: bool) -> dict[str, Entry]:
  """A bias-free CLIP projection `[P, D]` into our Dense at `ours`."""
  entries = {f"{ours}/kernel": linear_kernel(f"{ours}/kernel", source)}
  if has_bias:
    entries[f"{ours}/bias"] = zeros_entry()
  return entries


def _grid(num_patches: int) -> str:
  side = math.isqrt(num_patches)
  return f"{side}x{side}" if side * side == num_patches else f"{num_patches}-patch"
