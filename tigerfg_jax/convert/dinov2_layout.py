"""Where each tensor of a Hugging Face DINOv2 checkpoint goes in a `VisionEncoder`.

Works on a flat state dict `{name: np.ndarray}` of a `Dinov2Model` or
`Dinov2WithRegistersModel` as `save_pretrained` writes it (the Hub layout:
`embeddings.*`, `encoder.layer.N.attention.attention.query.weight`, ...,
`layernorm.*`). transformers 5 names its modules differently in memory
(`attention.q_proj`, `attention.o_proj`); a state dict saved with those names is
renamed into the Hub layout first.

Layout facts beyond the CLIP ones (`convert.clip_layout`):
- The position table has 1 + N rows (CLS first). Our ViT positions cover the patches;
  CLS enters as `cls_token + position[0]`, which is exactly our `cls` parameter.
  Registers (Dinov2WithRegisters) carry no position in either.
- The patch embedding conv has a bias (ours keeps it).
- LayerScale: `layer_scaleK.lambda1` `[D]` is our block's `lsK`.
- `embeddings.mask_token` (the masked-image-modelling token of pretraining) and the
  attention key biases cannot change the output of an unmasked forward pass: dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from tigerfg_jax.convert import clip_layout
from tigerfg_jax.convert.clip_layout import ConversionError, Entry

EMBEDDINGS = "embeddings"
POSITIONS = f"{EMBEDDINGS}.position_embeddings"
PATCH_WEIGHT = f"{EMBEDDINGS}.patch_embeddings.projection.weight"
MASK_TOKEN = f"{EMBEDDINGS}.mask_token"
REGISTERS = f"{EMBEDDINGS}.register_tokens"

_IN_MEMORY_NAMES = (
    (".attention.q_proj.", ".attention.attention.query."),
    (".attention.k_proj.", ".attention.attention.key."),
    (".attention.v_proj.", ".attention.attention.value."),
    (".attention.o_proj.", ".attention.output.dense."),
)


def to_hub_layout(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`state` with transformers 5's in-memory attention names renamed to the Hub's."""
  out = {}
  for name, value in state.items():
    for new, old in _IN_MEMORY_NAMES:
      name = name.replace(new, old)
    out[name] = value
  return out


def num_layers(state: Mapping[str, np.ndarray]) -> int:
  """Blocks in the state dict (`encoder.layer.N.*`)."""
  indices = [int(m.group(1)) for m in map(re.compile(r"^encoder\.layer\.(\d+)\.").match,
                                          state) if m]
  return max(indices) + 1 if indices else 0


def _block(ours: str, theirs: str, qkv_bias: bool) -> dict[str, Entry]:
  entries = {}
  for norm in ("norm1", "norm2"):
    entries.update(_norm(f"{ours}/{norm}", f"{theirs}.{norm}"))
  attention = f"{theirs}.attention.attention"
  for head_ours, head_theirs in (("query", "query"), ("key", "key"), ("value", "value")):
    path = f"{ours}/attn/{head_ours}"
    entries[f"{path}/kernel"] = clip_layout.head_kernel(
        f"{path}/kernel", f"{attention}.{head_theirs}.weight")
    if head_ours != "key":  # The key bias is dropped (`dropped_tensors`).
      entries[f"{path}/bias"] = (
          clip_layout.head_bias(f"{path}/bias", f"{attention}.{head_theirs}.bias")
          if qkv_bias else clip_layout.zeros_entry())
  output = f"{theirs}.attention.output.dense"
  entries[f"{ours}/attn/out/kernel"] = clip_layout.out_kernel(f"{ours}/attn/out/kernel",
                                                               f"{output}.weight")
  entries[f"{ours}/attn/out/bias"] = clip_layout.copy_tensor(f"{ours}/attn/out/bias",
                                                       f"{output}.bias")
  for k in (1, 2):
    entries[f"{ours}/ls{k}"] = clip_layout.copy_tensor(f"{ours}/ls{k}",
                                                 f"{theirs}.layer_scale{k}.lambda1")
  for fc in ("fc1", "fc2"):
    entries[f"{ours}/mlp/{fc}/kernel"] = clip_layout.linear_kernel(f"{ours}/mlp/{fc}/kernel",
                                                             f"{theirs}.mlp.{fc}.weight")
    entries[f"{ours}/mlp/{fc}/bias"] = clip_layout.copy_tensor(f"{ours}/mlp/{fc}/bias",
                                                         f"{theirs}.mlp.{fc}.bias")
  return entries


def _norm(ours: str, theirs: str) -> dict[str, Entry]:
  return {f"{ours}/scale": clip_layout.copy_tensor(f"{ours}/scale", f"{theirs}.weight"),
          f"{ours}/bias": clip_layout.copy_tensor(f"{ours}/bias", f"{theirs}.bias")}


def vision_entries(depth: int, num_registers: int, qkv_bias: bool) -> dict[str, Entry]:
  """`{our VisionEncoder param path: Entry}` (paths at the top of its tree)."""

  def patch_kernel(shape, w):
    return clip_layout.fit_array(w.transpose(2, 3, 1, 0), shape, shape,
                            f"patch_embed/kernel <- {PATCH_WEIGHT}")

  def patch_positions(shape, table):
    table = table.reshape(-1, table.shape[-1])
    return clip_layout.fit_array(table[1:], shape, shape, f"pos_embedding <- {POSITIONS}[1:]")

  def cls(shape, token, table):
    return clip_layout.fit_array(token.reshape(1, -1) + table.reshape(-1, table.shape[-1])[:1],
                            shape, shape,
                            f"cls <- {EMBEDDINGS}.cls_token + {POSITIONS}[0]")

  entries = {
      "patch_embed/kernel": Entry((PATCH_WEIGHT,), patch_kernel),
      "patch_embed/bias": clip_layout.copy_tensor(
          "patch_embed/bias", f"{EMBEDDINGS}.patch_embeddings.projection.bias"),
      "pos_embedding": Entry((POSITIONS,), patch_positions),
      "cls": Entry((f"{EMBEDDINGS}.cls_token", POSITIONS), cls),
      **_norm("encoder/norm", "layernorm"),
  }
  if num_registers:
    entries["registers"] = Entry((REGISTERS,), lambda shape, r: clip_layout.fit_array(
        r.reshape(-1, r.shape[-1]), shape, shape, f"registers <- {REGISTERS}"))
  for i in range(depth):
    entries.update(_block(f"encoder/block_{i}", f"encoder.layer.{i}", qkv_bias))
  return entries


def dropped_tensors(state: Mapping[str, np.ndarray]) -> dict[str, str]:
  """`{checkpoint name: why it is dropped}` for the tensors that cannot change the
  patch tokens."""
  dropped = {}
  if MASK_TOKEN in state:
    dropped[MASK_TOKEN] = ("masked-image-modelling token of pretraining; only used "
                           "with bool_masked_pos")
  for i in range(num_layers(state)):
    name = f"encoder.layer.{i}.attention.attention.key.bias"
    if name in state:
      dropped[name] = "attention key bias: a per-query constant logit, which the softmax ignores"
  return dropped


def check_is_dinov2(state: Mapping[str, np.ndarray], source: str) -> None:
  """ConversionError naming a few keys when `state` is not a DINOv2 state dict."""
  if PATCH_WEIGHT in state and POSITIONS in state and num_layers(state):
    return
  shown = ", ".join(sorted(state)[:6])
  raise ConversionError(
      f"{source}: not a Hugging Face DINOv2 checkpoint: expected {PATCH_WEIGHT!r}, "
      f"{POSITIONS!r} and 'encoder.layer.N.*'; found {len(state)} tensors: {shown}, ...")
