"""The towers as jitted encoders over a mesh, for evaluation and export."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from tigerfg_jax import sharding
from tigerfg_jax.models import towers


def make_embed_fns(model: towers.TigerFG,
                   mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """Jitted `(params, query_image) -> [B, E]` and
  `(params, item_image, title_tokens, title_mask, region_mask=None) -> [B, E]`.

  Params are an argument, not a closure: they are not baked into the compiled program
  (so one compilation serves every checkpoint of the same shapes). `region_mask` bool
  `[B, N]` restricts the item pooling to those patches (the box oracle's input).
  """
  repl = sharding.replicated(mesh)

  def embed_query(params, query_image):
    return model.apply({"params": params}, query_image, method=towers.TigerFG.embed_query)

  def embed_item(params, item_image, title_tokens, title_mask, region_mask=None):
    emb, _ = model.apply({"params": params}, item_image, title_tokens, title_mask,
                         region_mask, method=towers.TigerFG.embed_item)
    return emb

  return jax.jit(embed_query, out_shardings=repl), jax.jit(embed_item, out_shardings=repl)


def make_text_embed_fn(model: towers.TigerFG, mesh: jax.sharding.Mesh) -> Callable:
  """Jitted `(params, text_tokens int32 [B, Lq], text_mask bool [B, Lq]) -> [B, E']`,
  the text query tower (E' = 2E for the 'smar' fusion's gated query)."""
  def embed_text(params, text_tokens, text_mask):
    return model.apply({"params": params}, text_tokens, text_mask,
                       method=towers.TigerFG.embed_text_query)

  return jax.jit(embed_text, out_shardings=sharding.replicated(mesh))


def mesh_placer(mesh: jax.sharding.Mesh) -> Callable[[dict[str, np.ndarray]], dict]:
  """Puts an eval batch every process holds in full on the mesh, rows over 'data'."""
  batch_sharding = sharding.batch_sharding(mesh)

  def place(inputs: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    rows = len(next(iter(inputs.values())))
    if rows % mesh.shape["data"]:
      raise ValueError(f"eval batch of {rows} rows is not divisible by the "
                       f"{mesh.shape['data']} devices of the 'data' mesh axis "
                       "(set config.eval.batch_size to a multiple)")
    return sharding.global_batch_from_host(inputs, batch_sharding)

  return place
