"""ViT image encoder with registers (Dosovitskiy et al. 2020; Darcet et al. 2023).

Token layout of the output: `[CLS, register_1..R, patch_1..N]`, patches row-major over
the `S/patch x S/patch` grid. The learned position embedding covers the patches only
(as in big_vision); CLS and registers carry none, being position-free by design (a
converted CLIP checkpoint folds its CLS position into the CLS token).

The position embedding is learned on a fixed `posemb_grid x posemb_grid` grid and
resampled bilinearly to the grid of each input, so one ViT serves images of several
sizes (TIGER-FG's shared ViT sees small query crops and larger item images).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from tigerfg_jax.models import partitioning, transformer

_VARIANTS = {
    "mu": dict(width=32, depth=2, mlp_dim=64, num_heads=2),
    # The CPU default (`tiny` preset): trains in minutes on two cores.
    "pico": dict(width=96, depth=4, mlp_dim=384, num_heads=3),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}


class ViTSize(NamedTuple):
  """Explicit ViT sizes, for a checkpoint whose sizes no variant name gives (a converted
  patch teacher, `models.patch_teacher`)."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int


def decode_variant(name: str) -> dict[str, int]:
  """ViT size by name: 'mu' (tests), 'pico' (CPU default), 'Ti/16', 'S/16', 'B/16',
  'L/14' (or without '/p').

  The '/p' suffix names the usual patch size; the patch actually used is
  `config.model.patch_size`.

  Returns:
    `dict(width, depth, mlp_dim, num_heads)`.
  """
  size = name.split("/")[0]
  if size not in _VARIANTS:
    raise ValueError(f"config.model.vision_variant={name!r}: unknown ViT size; "
                     f"expected one of {sorted(_VARIANTS)} (optionally with '/patch')")
  return dict(_VARIANTS[size])


def resample_posemb(posemb: jax.Array, grid: int, new_grid: tuple[int, int]) -> jax.Array:
  """`[grid * grid, D]` row-major position embedding -> `[h * w, D]` for `new_grid=(h, w)`.

  Bilinear interpolation (antialiased when shrinking) of the embedding as an image; the
  same grid returns it unchanged.
  """
  if (grid, grid) == tuple(new_grid):
    return posemb
  width = posemb.shape[-1]
  image = posemb.reshape(grid, grid, width)
  resized = jax.image.resize(image, (*new_grid, width), method="bilinear")
  return resized.reshape(new_grid[0] * new_grid[1], width)


class VisionEncoder(nn.Module):
  """ViT over normalised float pixels.

  Attributes:
    variant: size name for `decode_variant`, or explicit `ViTSize`.
    patch_size: patch side in pixels; the image side must be a multiple of it.
    posemb_grid: side of the grid the position embedding is learned on (`[G * G, D]`);
      inputs of another grid get it resampled (`resample_posemb`).
    num_registers: R register tokens.
    pre_norm: a LayerNorm over all tokens before the blocks (CLIP's `ln_pre`).
    activation: the MLPs' activation (`transformer.ACTIVATIONS`).
    norm_eps: epsilon of every LayerNorm here.
    layer_scale: the blocks' LayerScale (`transformer.EncoderBlock`; None: off, as in
      every TigerFG tower).
    attention: self-attention kind (`transformer.ATTENTION_KINDS`).
    remat: the blocks' remat policy (`transformer.REMAT_POLICIES`).
    dtype: compute dtype.
  """
  variant: str | ViTSize
  patch_size: int
  posemb_grid: int
  num_registers: int = 0
  pre_norm: bool = False
  activation: str = "gelu"
  norm_eps: float = 1e-6
  layer_scale: float | None = None
  attention: str = "dot_product"
  remat: str = "none"
  dtype: Any = jnp.float32

  @property
  def size(self) -> ViTSize:
    """The ViT's sizes (`variant` decoded)."""
    return (self.variant if isinstance(self.variant, ViTSize)
            else ViTSize(**decode_variant(self.variant)))

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """`[B, S, S, 3]` normalised pixels -> tokens `[B, 1 + R + N, D]` in dtype."""
    size = self.size
    width = size.width
    image_h, image_w = images.shape[1:3]
    if image_h % self.patch_size or image_w % self.patch_size:
      raise ValueError(f"image size {image_h}x{image_w} is not a multiple of "
                       f"config.model.patch_size={self.patch_size}")
    x = nn.Conv(
        width, (self.patch_size, self.patch_size), strides=self.patch_size,
        padding="VALID", dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=partitioning.init(nn.initializers.lecun_normal(),
                                      (None, None, None, "embed")),
        bias_init=partitioning.init(nn.initializers.zeros, ("embed",)),
        name="patch_embed")(images.astype(self.dtype))
    batch, grid_h, grid_w, _ = x.shape
    x = x.reshape(batch, grid_h * grid_w, width)
    position = self.param(
        "pos_embedding",
        partitioning.init(nn.initializers.normal(0.02), (None, "embed")),
        (self.posemb_grid ** 2, width), jnp.float32)
    position = resample_posemb(position, self.posemb_grid, (grid_h, grid_w))
    x = x + position.astype(self.dtype)
    cls = self.param(
        "cls", partitioning.init(nn.initializers.normal(0.02), (None, "embed")),
        (1, width), jnp.float32)
    prefix = [cls]
    if self.num_registers:
      prefix.append(self.param(
          "registers",
          partitioning.init(nn.initializers.normal(0.02), (None, "embed")),
          (self.num_registers, width), jnp.float32))
    prefix = jnp.concatenate(prefix).astype(self.dtype)
    x = jnp.concatenate(
        [jnp.broadcast_to(prefix, (batch, *prefix.shape)), x], axis=1)
    if self.pre_norm:
      x = partitioning.layer_norm(dtype=self.dtype, epsilon=self.norm_eps,
                                  name="pre_norm")(x)
    return transformer.Encoder(size.depth, size.num_heads, size.mlp_dim,
                               activation=self.activation, norm_eps=self.norm_eps,
                               attention=self.attention, layer_scale=self.layer_scale,
                               remat=self.remat, dtype=self.dtype, name="encoder")(x)
