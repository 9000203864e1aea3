"""The frozen patch teacher of the spatial-relation distillation loss L_SRD
(docs/ARCHITECTURE.md "Patch teacher (L_SRD)").

A patch teacher folder (written by `python -m tigerfg_jax.convert --format=dinov2`):

  FOLDER/
    patch_teacher.json   `PatchTeacherSpec`: the ViT's sizes and options, the pixel
                         normalisation and how its position table is resampled
    params/              Orbax (StandardCheckpointer): the `VisionEncoder` params
    convert_report.json  what the converter mapped and dropped (not read here)

`load_patch_teacher(folder)` reads it; `patch_tokens(teacher, images, grid)` gives the
teacher's patch tokens on the student's patch grid.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import struct

from tigerfg_jax.models import vision

SPEC_FILE = "patch_teacher.json"
PARAMS_DIR = "params"
FORMAT = "tigerfg_jax.patch_teacher/1"

# How the teacher's position table is resampled to another grid, as the checkpoint's
# own implementation does it (so the tokens are the ones it was trained to give):
#   'bicubic': torch `interpolate(mode='bicubic', align_corners=False)` without
#     antialiasing (Keys cubic a=-0.75, edge taps clamped), as transformers' Dinov2Model.
#   'bicubic_antialias': the same with `antialias=True` (a=-0.5, kernel widened when
#     shrinking, weights renormalised at the edges), as Dinov2WithRegistersModel;
#     `jax.image.resize(method='bicubic')` computes exactly that.
POSEMB_RESIZES = ("bicubic", "bicubic_antialias")


@dataclasses.dataclass(frozen=True)
class PatchTeacherSpec:
  """The hyperparameters of a patch teacher's ViT (`vision.VisionEncoder`).

  Attributes:
    width, depth, mlp_dim, num_heads: the ViT's sizes.
    patch_size: patch side in pixels.
    posemb_grid: side of the grid its position table is stored on (`[G * G, D]`).
    num_registers: register tokens after CLS (0 for Dinov2Model).
    norm_eps: epsilon of every LayerNorm.
    layer_scale: the blocks' LayerScale initial value (None: the ViT has none).
    activation: the MLPs' activation (`transformer.ACTIVATIONS`).
    pixel_mean, pixel_std: per-channel RGB normalisation of [0, 1] pixels.
    posemb_resize: one of `POSEMB_RESIZES`.
    source: the checkpoint it was converted from (informational).
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  posemb_grid: int
  num_registers: int
  norm_eps: float
  layer_scale: float | None
  activation: str
  pixel_mean: tuple[float, float, float]
  pixel_std: tuple[float, float, float]
  posemb_resize: str
  source: str = ""

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT, **dataclasses.asdict(self)}

  @classmethod
  def from_json(cls, content: Any, where: str) -> "PatchTeacherSpec":
    """The spec in `content` (a parsed `SPEC_FILE`); ValueError naming `where` and the
    missing or odd key."""
    if not isinstance(content, dict) or content.get("format") != FORMAT:
      found = content.get("format") if isinstance(content, dict) else type(content).__name__
      raise ValueError(f"{where}: not a patch teacher spec (expected \"format\": "
                       f"{FORMAT!r}, found {found!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    missing = sorted(n for n, f in fields.items()
                     if n not in content and f.default is dataclasses.MISSING)
    if missing:
      raise ValueError(f"{where}: missing keys {missing}")
    values = {n: content[n] for n in fields if n in content}
    for name in ("pixel_mean", "pixel_std"):
      if not (isinstance(values[name], list) and len(values[name]) == 3):
        raise ValueError(f"{where}: {name} must be a list of 3 numbers (RGB), "
                         f"got {values[name]!r}")
      values[name] = tuple(float(v) for v in values[name])
    if values["posemb_resize"] not in POSEMB_RESIZES:
      raise ValueError(f"{where}: posemb_resize={values['posemb_resize']!r}; expected "
                       f"one of {POSEMB_RESIZES}")
    return cls(**values)


def vision_encoder(spec: PatchTeacherSpec, posemb_grid: int | None = None
                   ) -> vision.VisionEncoder:
  """The teacher's ViT; `posemb_grid` overrides the stored grid (`patch_tokens` hands
  it a position table already resampled to the input's grid)."""
  return vision.VisionEncoder(
      vision.ViTSize(spec.width, spec.depth, spec.mlp_dim, spec.num_heads),
      spec.patch_size, posemb_grid or spec.posemb_grid, num_registers=spec.num_registers,
      activation=spec.activation, norm_eps=spec.norm_eps, layer_scale=spec.layer_scale)


@struct.dataclass
class PatchTeacher:
  """A loaded patch teacher: a pytree whose only leaves are the params, so it can be
  passed to a jitted function (module and spec are static)."""
  params: Any
  spec: PatchTeacherSpec = struct.field(pytree_node=False)
  module: vision.VisionEncoder = struct.field(pytree_node=False)


def abstract_params(spec: PatchTeacherSpec) -> Any:
  """The float32 params of the spec's ViT as `jax.ShapeDtypeStruct`s (no allocation)."""
  side = spec.posemb_grid * spec.patch_size
  images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  return nn.meta.unbox(jax.eval_shape(
      vision_encoder(spec).init, jax.random.PRNGKey(0), images)["params"])


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(leaf.shape)
          for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load_patch_teacher(folder: str,
                       sharding: jax.sharding.Sharding | None = None) -> PatchTeacher:
  """Reads a patch teacher folder (module docstring).

  Args:
    folder: the converter's output folder.
    sharding: where every param goes (default: the first local device).

  Raises:
    FileNotFoundError: the folder, its spec or its params are missing (named).
    ValueError: an odd spec, or params that do not fit the spec (each array named).
  """
  spec_path = os.path.join(folder, SPEC_FILE)
  params_dir = os.path.abspath(os.path.join(folder, PARAMS_DIR))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"patch teacher {folder}: no such folder")
  for path, what in ((spec_path, "the spec"), (params_dir, "the params (Orbax)")):
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"patch teacher {folder}: {path} ({what}) is missing; write the folder with "
          "`python -m tigerfg_jax.convert --format=dinov2`")
  try:
    with open(spec_path) as f:
      content = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{spec_path}: not valid JSON ({error})") from error
  spec = PatchTeacherSpec.from_json(content, spec_path)
  abstract = abstract_params(spec)
  checkpointer = ocp.StandardCheckpointer()
  stored = _shapes(checkpointer.metadata(params_dir).item_metadata.tree)
  wanted = _shapes(abstract)
  problems = [f"{name}: stored {stored.get(name, 'nothing')}, the spec gives {shape}"
              for name, shape in wanted.items() if stored.get(name) != shape]
  problems += [f"{name}: stored but not in the spec's ViT" for name in stored
               if name not in wanted]
  if problems:
    raise ValueError(f"{params_dir} does not fit {spec_path}:\n  " + "\n  ".join(problems))
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract)
  return PatchTeacher(checkpointer.restore(params_dir, target), spec, vision_encoder(spec))


# ---------------------------------------------------------------- resampling ---

def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel at offsets `x` (float64)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def torch_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """float64 `[size_out, size_in]`: torch's 1-D bicubic resize (a=-0.75,
  align_corners=False, no antialiasing, source indices clamped at the edges) as a
  matrix."""
  source = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  first = np.floor(source).astype(int)
  matrix = np.zeros((size_out, size_in))
  for tap in range(-1, 3):
    weights = _keys_cubic(source - (first + tap), a=-0.75)
    np.add.at(matrix, (np.arange(size_out), np.clip(first + tap, 0, size_in - 1)), weights)
  return matrix


def resample_positions(table: jax.Array, grid: int, new_grid: int, method: str
                       ) -> jax.Array:
  """`[grid * grid, D]` row-major position table -> `[new_grid * new_grid, D]` float32
  (`method` one of `POSEMB_RESIZES`; the same grid returns it unchanged)."""
  if grid == new_grid:
    return table
  image = table.reshape(grid, grid, -1).astype(jnp.float32)
  if method == "bicubic":
    matrix = jnp.asarray(torch_bicubic_matrix(grid, new_grid), jnp.float32)
    resized = jnp.einsum("ij,kl,jld->ikd", matrix, matrix, image,
                         precision=jax.lax.Precision.HIGHEST)
  else:
    resized = jax.image.resize(image, (new_grid, new_grid, image.shape[-1]), "bicubic")
  return resized.reshape(new_grid * new_grid, -1)


def resize_images(images: jax.Array, size: int) -> jax.Array:
  """uint8 (or float pixel values) `[B, S, S, 3]` -> float32 `[B, size, size, 3]` in
  [0, 255]: antialiased bicubic (a=-0.5, as PIL's and torch's antialiased bicubic;
  DINOv2's own preprocessing resizes bicubically), clipped to the pixel range."""
  pixels = images.astype(jnp.float32)
  if pixels.shape[1:3] == (size, size):
    return pixels
  resized = jax.image.resize(pixels, (pixels.shape[0], size, size, pixels.shape[3]),
                             "bicubic")
  return jnp.clip(resized, 0.0, 255.0)


def patch_tokens(teacher: PatchTeacher, images_uint8: jax.Array, grid: int) -> jax.Array:
  """The teacher's patch tokens on a `grid x grid` patch grid.

  The images are resized to `grid * patch_size` pixels (`resize_images`; a 64 px image
  for an 8 x 8 student grid becomes 112 px for DINOv2's 14 px patches), normalised with
  the teacher's mean/std, and the position table resampled to `grid` as the checkpoint's
  implementation does it (`POSEMB_RESIZES`). Pure and jit-able (`grid` static); the
  caller wraps the result in `stop_gradient`.

  Args:
    teacher: from `load_patch_teacher`.
    images_uint8: `[B, S, S, 3]` RGB pixels in [0, 255] (any S).
    grid: the student's patch grid side.

  Returns:
    float32 `[B, grid * grid, D]`, after the final LayerNorm, row-major over the grid.
  """
  spec = teacher.spec
  pixels = resize_images(images_uint8, grid * spec.patch_size) / 255.0
  mean = jnp.asarray(spec.pixel_mean, jnp.float32)
  std = jnp.asarray(spec.pixel_std, jnp.float32)
  params = dict(teacher.params)
  params["pos_embedding"] = resample_positions(params["pos_embedding"], spec.posemb_grid,
                                               grid, spec.posemb_resize)
  tokens = vision_encoder(spec, posemb_grid=grid).apply(
      {"params": params}, (pixels - mean) / std)
  return tokens[:, 1 + spec.num_registers:].astype(jnp.float32)

