"""The two retrieval towers and `TigerFG`, the model the train step and exports call.

Parameter tree of `TigerFG` (what `summary` and `convert` rely on):
  vision/          ViT of the query tower; also the item tower's when `share_vision`.
  item_vision/     the item tower's own ViT (only when not `share_vision`).
  query_tower/     `projection` (+ `map_head` when `query_pool='map'`).
  item_tower/      `text_encoder`, `pooling` (TextGuidedPooling, or a MAPHead in
                   'clip_style'), `merge_norm` + `merge_mlp` ('tiger'), `projection`;
                   another item fusion's own layers (models/fusion.py).
  text_query_encoder/, text_query_projection/, text_query_gate/
                   the text query tower (only with `text_query_encoder` 'own'; the
                   gate only for 'smar'; 'title' reuses item_tower/text_encoder).
  log_temperature  scalar.

Query and item images may differ in size, also with one shared ViT: its position table
is resampled to each input's grid (`vision.resample_posemb`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tigerfg_jax.models import fusion, partitioning, pooling, text, transformer, vision, zoom
from tigerfg_jax.models.normalize import l2_normalize, normalize_pixels

MODES = ("tiger", "clip_style")
# `config.model.item_fusion`: the item side ('tiger' and 'concat' are `ItemTower`s, the
# others `fusion.FusionItemTower`s; docs/ARCHITECTURE.md "Text queries").
ITEM_FUSIONS = ("tiger", "concat", *fusion.FUSIONS)
# `config.model.text_query_encoder`: no text query tower | the item tower's title
# encoder (shared parameters) | an encoder of its own.
TEXT_QUERY_ENCODERS = ("none", "title", "own")
QUERY_POOLS = ("cls", "map")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The allowed values of each `config.model` key that has a fixed set (config_lib
# validates configs against this table; `TigerFG` checks its own config with it).
CHOICES = {
    "mode": MODES,
    "query_pool": QUERY_POOLS,
    "dtype": tuple(DTYPES),
    "mlp_activation": tuple(transformer.ACTIVATIONS),
    "text_pool": text.POOLS,
    "attention": transformer.ATTENTION_KINDS,
    "remat": transformer.REMAT_POLICIES,
    "item_fusion": ITEM_FUSIONS,
    "text_query_encoder": TEXT_QUERY_ENCODERS,
}


class QueryTower(nn.Module):
  """Query image -> ViT -> CLS (or MAP over patches) -> Dense(E) -> L2.

  Attributes:
    vision: the ViT (a `VisionEncoder`, possibly shared with the item tower).
    num_registers: R, to find the patches after CLS and the registers.
    query_pool: 'cls' | 'map'.
    embed_dim: E.
    map_heads, map_mlp_dim: the MAP head's size (query_pool='map').
    pixel_mean, pixel_std: per-channel normalisation of 0..255 pixels.
    dtype: compute dtype.
  """
  vision: nn.Module
  num_registers: int
  query_pool: str
  embed_dim: int
  map_heads: int
  map_mlp_dim: int
  pixel_mean: Sequence[float]
  pixel_std: Sequence[float]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """uint8 `[B, S, S, 3]` -> float32 `[B, E]`, L2-normalised."""
    tokens = self.vision(normalize_pixels(images, self.pixel_mean, self.pixel_std,
                                          self.dtype))
    if self.query_pool == "cls":
      feature = tokens[:, 0]
    else:
      feature, _ = pooling.MAPHead(self.map_heads, self.map_mlp_dim, dtype=self.dtype,
                                   name="map_head")(tokens[:, 1 + self.num_registers:])
    embedding = partitioning.dense(self.embed_dim, ("embed", "proj"), dtype=self.dtype,
                                   name="projection")(feature)
    return l2_normalize(embedding)


def swap_partners(batch_size: int, count: int) -> jax.Array:
  """int32 `[B, K]`: the K other batch rows whose titles row r is re-pooled under.

  Row r takes the titles of rows r + 1, ..., r + K (mod B). Examples of one Mosaic
  canvas are consecutive rows, so its tile-mates' titles (products that are in the
  image) come first.
  """
  if not 0 <= count < batch_size:
    raise ValueError(f"loss.hard_negatives={count}: expected 0 <= K < the batch size "
                     f"{batch_size}")
  rows = jnp.arange(batch_size, dtype=jnp.int32)[:, None]
  return (rows + jnp.arange(1, count + 1, dtype=jnp.int32)[None, :]) % batch_size


class ItemTower(nn.Module):
  """Item image + title -> float32 `[B, E]` L2-normalised embedding.

  'tiger': TextGuidedPooling over the patches; `f_i = f_a + MLP(LN(f_m))`.
  'clip_style': a MAPHead pools the whole image (the title plays no part in the
  pooling); `f_i = concat(global, pooled title)`. Both then Dense(E) -> L2.

  Two small heads serve the region-text alignment `L_v2t`: `region_projection` maps
  the pooled visual feature (`f_a`, or the MAP output) and `title_projection` the
  pooled title to E dims.

  With `zoom_threshold` > 0 the tower looks again (models/zoom.py): the whole image,
  then the square around the region its first attention map picks, cut out and
  resized to the image size; with `zoom_refinements` = n, n more times, each at the
  square around the region the previous crop's own attention picks (placed back in
  the image and cut from it). Each embedding (the own title's and every title swap's)
  is the normalised sum of the first look's and the last's. The title is encoded once.

  Attributes:
    vision: the ViT (a `VisionEncoder`, possibly shared with the query tower).
    text_variant, vocab_size, max_title_len, text_causal, text_pool, text_proj_dim,
      mlp_activation, norm_eps, attention, remat: the title's `TextEncoder` (its
      variant, vocab_size, max_len, causal, pool, proj_dim, activation, norm_eps,
      attention, remat).
    mode: 'tiger' | 'clip_style'.
    num_registers: R.
    pooling_slots, pooling_heads, pooling_mlp_dim: pooling sizes.
    embed_dim: E.
    pixel_mean, pixel_std: per-channel normalisation of 0..255 pixels.
    zoom_threshold: 0 (one look) or the fraction of the attention peak whose
      connected cells the zoom keeps (`zoom.attention_box`).
    zoom_refinements: n >= 0 looks after the first zoom, each inside the last crop.
    dtype: compute dtype.
  """
  vision: nn.Module
  text_variant: str
  vocab_size: int
  max_title_len: int
  text_causal: bool
  text_pool: str
  text_proj_dim: int
  mlp_activation: str
  norm_eps: float
  attention: str
  remat: str
  mode: str
  num_registers: int
  pooling_slots: int
  pooling_heads: int
  pooling_mlp_dim: int
  embed_dim: int
  pixel_mean: Sequence[float]
  pixel_std: Sequence[float]
  zoom_threshold: float = 0.0
  zoom_refinements: int = 0
  dtype: Any = jnp.float32

  def setup(self):
    self.text_encoder = text.TextEncoder(
        self.text_variant, self.vocab_size, self.max_title_len,
        causal=self.text_causal, pool=self.text_pool, proj_dim=self.text_proj_dim,
        activation=self.mlp_activation, norm_eps=self.norm_eps,
        attention=self.attention, remat=self.remat, dtype=self.dtype)
    if self.mode == "tiger":
      self.pooling = pooling.TextGuidedPooling(
          self.pooling_slots, self.pooling_heads, self.pooling_mlp_dim, dtype=self.dtype)
      self.merge_norm = partitioning.layer_norm(dtype=self.dtype)
      self.merge_mlp = transformer.MlpBlock(self.pooling_mlp_dim, dtype=self.dtype)
    else:
      self.pooling = pooling.MAPHead(self.pooling_heads, self.pooling_mlp_dim,
                                     dtype=self.dtype)
    dense = functools.partial(partitioning.dense, self.embed_dim, ("embed", "proj"),
                              dtype=self.dtype)
    self.projection = dense()
    self.region_projection = dense()
    self.title_projection = dense()

  def __call__(self, images: jax.Array, title_tokens: jax.Array,
               title_mask: jax.Array, region_mask: jax.Array | None = None,
               swap_titles: int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embeds items.

    Args:
      images: uint8 `[B, S, S, 3]`.
      title_tokens: int32 `[B, L]`.
      title_mask: bool `[B, L]`, True on real tokens.
      region_mask: bool `[B, N]` or None: the patches the pooling may read.
      swap_titles: K >= 0: also pool each item's patches under the titles of its
        `swap_partners(B, K)`. The ViT runs once and the patches' attention keys and
        values are projected once: only the title-dependent part of the pooling
        reruns ('clip_style' pools without the title: only the fusion reruns).

    Returns:
      `(embedding float32 [B, E], aux)`; aux holds `attention` float32 `[B, H, N]`
      (the pooling's map over patches), `patches` `[B, N, D]` (dtype, the ViT's
      patch tokens, for the spatial-relation loss), `region_emb` and `title_emb`
      float32 `[B, E]` L2-normalised (for `L_v2t`) and, with K > 0, `swap_emb`
      float32 `[B, K, E]`: row r pooled under the title of row
      `swap_partners(B, K)[r, k]`. With a zoom, `zoom_box` float32 `[B, 4]` (the
      last crop, normalised x0, y0, x1, y1 of the image); the other aux entries are
      the first look's.
    """
    title, title_pooled = self.text_encoder(title_tokens, title_mask)
    # Title t of row r: its own (t = 0), then its swap partners' ([B, 1 + K, ...]).
    rows = jnp.arange(images.shape[0], dtype=jnp.int32)[:, None]
    owners = jnp.concatenate([rows, swap_partners(images.shape[0], swap_titles)], axis=1)
    titles = dict(title=title[owners], title_mask=title_mask[owners],
                  title_pooled=title_pooled[owners])
    embeddings, region, aux = self._look(images, titles, region_mask)
    # The slots' reading of the titles does not depend on the pixels: a second look
    # reuses it.
    title_slots = aux.pop("title_slots", None)
    if self.zoom_threshold:
      box = jnp.tile(jnp.float32(zoom.WHOLE_IMAGE), (images.shape[0], 1))
      attention = aux["attention"]
      # A refinement's look only places the next crop: it reads the own title alone.
      own = {k: v[:, :1] for k, v in titles.items()}
      if title_slots is not None:
        own["title_slots"] = title_slots[:, :self.pooling_slots]
      for _ in range(self.zoom_refinements):
        box = self._zoom_box(box, attention)
        _, _, looked = self._look(zoom.crop_resize(images, box), own, None)
        attention = looked["attention"]
      box = self._zoom_box(box, attention)
      zoomed, _, _ = self._look(zoom.crop_resize(images, box),
                                dict(titles, title_slots=title_slots), None)
      embeddings = l2_normalize(embeddings + zoomed)
      aux["zoom_box"] = box
    aux.update(region_emb=l2_normalize(self.region_projection(region)),
               title_emb=l2_normalize(self.title_projection(title_pooled)))
    if swap_titles:
      aux["swap_emb"] = embeddings[:, 1:]
    return embeddings[:, 0], aux

  def _zoom_box(self, region: jax.Array, attention: jax.Array) -> jax.Array:
    """float32 `[B, 4]` normalised region of the image a look read, and that look's
    attention float32 `[B, H, N]` -> the next crop, `[B, 4]` in the image."""
    grid = math.isqrt(attention.shape[-1])   # item images are square.
    found = zoom.attention_box(attention.mean(axis=1).reshape(-1, grid, grid),
                               self.zoom_threshold)
    return zoom.context_square(zoom.within(region, found), zoom.CONTEXT_MARGIN)

  def _look(self, images: jax.Array, titles: dict[str, jax.Array | None],
            region_mask: jax.Array | None) -> tuple[jax.Array, jax.Array, dict]:
    """One pass over the pixels: the ViT, then the pooling under each of T titles.

    `titles`: `title` token states `[B, T, L, Dt]`, `title_mask` bool `[B, T, L]`,
    `title_pooled` `[B, T, Dt]` and optionally `title_slots` (an earlier look's,
    `TextGuidedPooling`). Returns the embeddings float32 `[B, T, E]` (L2), the pooled
    visual feature `[B, D]` under the own title (t = 0) and `{'attention' [B, H, N],
    'patches' [B, N, D]}` (+ 'tiger': `title_slots`).
    """
    tokens = self.vision(normalize_pixels(images, self.pixel_mean, self.pixel_std,
                                          self.dtype))
    cls, patches = tokens[:, 0], tokens[:, 1 + self.num_registers:]
    title_pooled = titles["title_pooled"]
    looked: dict[str, jax.Array] = dict(patches=patches)
    if self.mode == "tiger":
      pooled = self.pooling(cls, patches, titles["title"], titles["title_mask"], region_mask,
                            titles.get("title_slots"))
      region = pooled["f_a"][:, 0]
      features = pooled["f_a"] + self.merge_mlp(self.merge_norm(pooled["f_m"]))
      looked.update(attention=pooled["attention"][:, :, 0, :],
                    title_slots=pooled["title_slots"])
    else:
      region, looked["attention"] = self.pooling(patches, region_mask)
      features = jnp.concatenate(
          [jnp.broadcast_to(region[:, None], (*title_pooled.shape[:2], region.shape[-1])),
           title_pooled], axis=-1)
    embeddings = l2_normalize(self.projection(features))
    return embeddings, region, looked


class TigerFG(nn.Module):
  """Query tower + item tower + the learnable temperature.

  Attributes:
    config: `config.model` (ConfigDict or FrozenConfigDict); `vocab_size` must be
      set (> 0).
  """
  config: ml_collections.ConfigDict | ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    _check_model_config(c)
    dtype = DTYPES[c.dtype]
    vit = dict(variant=c.vision_variant, patch_size=c.patch_size,
               posemb_grid=c.posemb_grid, num_registers=c.num_registers,
               pre_norm=c.vision_pre_norm,
               activation=c.mlp_activation, norm_eps=c.norm_eps,
               attention=c.attention, remat=c.remat, dtype=dtype)
    self.vision = vision.VisionEncoder(**vit)
    if not c.share_vision:
      self.item_vision = vision.VisionEncoder(**vit)
    pixels = dict(pixel_mean=tuple(c.pixel_mean), pixel_std=tuple(c.pixel_std))
    self.query_tower = QueryTower(
        vision=self.vision, num_registers=c.num_registers, query_pool=c.query_pool,
        embed_dim=c.embed_dim, map_heads=c.pooling_heads,
        map_mlp_dim=c.pooling_mlp_dim, dtype=dtype, **pixels)
    item_vision = self.vision if c.share_vision else self.item_vision
    text_encoder = dict(variant=c.text_variant, vocab_size=c.vocab_size,
                        max_len=c.max_title_len, causal=c.text_causal, pool=c.text_pool,
                        proj_dim=c.text_proj_dim, activation=c.mlp_activation,
                        norm_eps=c.norm_eps, attention=c.attention, remat=c.remat)
    if c.item_fusion in fusion.FUSIONS:
      self.item_tower = fusion.FusionItemTower(
          fusion=c.item_fusion, vision=item_vision, text_encoder_kwargs=text_encoder,
          num_registers=c.num_registers, num_heads=c.pooling_heads,
          mlp_dim=c.pooling_mlp_dim, embed_dim=c.embed_dim, dtype=dtype, **pixels)
    else:
      self.item_tower = ItemTower(
          vision=item_vision, text_variant=c.text_variant, vocab_size=c.vocab_size,
          max_title_len=c.max_title_len, text_causal=c.text_causal,
          text_pool=c.text_pool, text_proj_dim=c.text_proj_dim,
          mlp_activation=c.mlp_activation, norm_eps=c.norm_eps,
          attention=c.attention, remat=c.remat,
          mode="clip_style" if c.item_fusion == "concat" else c.mode,
          num_registers=c.num_registers,
          pooling_slots=c.pooling_slots, pooling_heads=c.pooling_heads,
          pooling_mlp_dim=c.pooling_mlp_dim, embed_dim=c.embed_dim,
          zoom_threshold=c.zoom_threshold, zoom_refinements=c.zoom_refinements,
          dtype=dtype, **pixels)
    if c.text_query_encoder == "own":
      self.text_query_encoder = text.TextEncoder(
          **dict(text_encoder, max_len=c.max_query_len), dtype=dtype)
    if c.text_query_encoder != "none":
      self.text_query_projection = partitioning.dense(c.embed_dim, ("embed", "proj"),
                                                      dtype=dtype)
    if c.text_query_encoder != "none" and c.item_fusion == "smar":
      self.text_query_gate = partitioning.dense(1, ("embed", None), dtype=dtype)
    self.log_temperature = self.param(
        "log_temperature",
        partitioning.init(nn.initializers.constant(math.log(c.temperature_init)), ()),
        (), jnp.float32)

  def temperature(self) -> jax.Array:
    """float32 scalar tau = clip(exp(log_temperature), temperature_min, 1)."""
    return jnp.clip(jnp.exp(self.log_temperature), self.config.temperature_min, 1.0)

  def embed_query(self, query_image: jax.Array) -> jax.Array:
    """uint8 `[B, Sq, Sq, 3]` -> float32 `[B, E]`, L2-normalised."""
    return self.query_tower(query_image)

  def embed_text_query(self, text_tokens: jax.Array, text_mask: jax.Array,
                       with_unit: bool = False):
    """int32 `[B, Lq]`, bool `[B, Lq]` -> float32 `[B, E']`: the searched text query.

    The query's pooled text -> Dense(E) -> L2 is `q`; with the 'smar' fusion the
    searched vector is `fusion.gated_query(q, sigmoid(Dense(1)(q)))` `[B, 2E]`, else
    `q`. `with_unit`: returns `(searched, q)`.
    """
    encoder = (self.text_query_encoder if self.config.text_query_encoder == "own"
               else self.item_tower.text_encoder)
    _, pooled = encoder(text_tokens, text_mask)
    unit = l2_normalize(self.text_query_projection(pooled))
    searched = unit
    if self.config.item_fusion == "smar":
      gate = jax.nn.sigmoid(self.text_query_gate(unit).astype(jnp.float32))
      searched = fusion.gated_query(unit, gate)
    return (searched, unit) if with_unit else searched

  def embed_item(self, item_image: jax.Array, title_tokens: jax.Array,
                 title_mask: jax.Array, region_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """See `ItemTower.__call__`: `([B, E] float32, {'attention', 'patches', ...})`."""
    return self.item_tower(item_image, title_tokens, title_mask, region_mask)

  def __call__(self, batch: dict[str, jax.Array], *,
               region_mask: jax.Array | None = None, swap_titles: int = 0,
               train: bool = False) -> dict[str, jax.Array]:
    """Both towers on a training batch.

    Args:
      batch: `query_image` (optional: without it no `query_emb`), `item_image`
        uint8, `title_tokens` int32 `[B, L]`, `title_mask` bool `[B, L]`, optionally
        `text_tokens` int32 `[B, Lq]` and `text_mask` bool `[B, Lq]`
        (docs/ARCHITECTURE.md).
      region_mask: bool `[B, N]` or None; the item pooling reads only these patches.
      swap_titles: K: also pool each item under K other titles of the batch
        (`swap_partners`), the title-swap hard negatives.
      train: part of the call contract; no layer here behaves differently in
        training (there is no dropout), so it changes nothing.

    Returns:
      dict: `query_emb`, `item_emb` float32 `[B, E]`; `attention` float32
      `[B, H, N]`; `item_patches` `[B, N, D]`; `region_emb`, `title_emb` float32
      `[B, E]`; `swap_emb` float32 `[B, K, E]` (only with K > 0); `temperature` float32
      scalar. Other item fusions: `item_emb` `[B, E']` and their aux
      (`fusion.FusionItemTower`). With text queries and a text query tower:
      `text_query_emb` `[B, E']` (searched) and `text_query_unit` `[B, E]`.
    """
    del train
    item_emb, aux = self.item_tower(batch["item_image"], batch["title_tokens"],
                                    batch["title_mask"], region_mask, swap_titles)
    outputs = dict(item_emb=item_emb, temperature=self.temperature())
    if "query_image" in batch:
      outputs["query_emb"] = self.embed_query(batch["query_image"])
    if "patches" in aux:
      outputs["item_patches"] = aux.pop("patches")
    outputs.update(aux)
    if "text_tokens" in batch and self.config.text_query_encoder != "none":
      outputs["text_query_emb"], outputs["text_query_unit"] = self.embed_text_query(
          batch["text_tokens"], batch["text_mask"], with_unit=True)
    return outputs


def _check_model_config(c: ml_collections.ConfigDict) -> None:
  """Clear errors for `config.model` values the modules cannot use."""
  if c.posemb_grid < 1:
    raise ValueError(f"config.model.posemb_grid={c.posemb_grid}: expected a positive "
                     "grid side (usually data.item_image_size / model.patch_size)")
  for key, allowed in CHOICES.items():
    if c[key] not in allowed:
      raise ValueError(f"config.model.{key}={c[key]!r}; expected one of {allowed}")
  if c.vocab_size <= 0:
    raise ValueError(f"config.model.vocab_size={c.vocab_size}: must be > 0 (set it "
                     "from the tokenizer's vocabulary size)")
  if not 0 <= c.zoom_threshold <= 1:
    raise ValueError(f"config.model.zoom_threshold={c.zoom_threshold}: expected 0 (no "
                     "zoom) or a fraction of the attention peak in (0, 1]")
  if c.zoom_refinements < 0:
    raise ValueError(f"config.model.zoom_refinements={c.zoom_refinements}: expected the "
                     "number of looks after the first zoom, >= 0")
  if c.zoom_threshold and c.item_fusion in fusion.FUSIONS:
    raise ValueError(f"config.model.zoom_threshold={c.zoom_threshold}: the zoom reads the "
                     "TIGER-FG item tower's attention; model.item_fusion="
                     f"{c.item_fusion!r} has none (set zoom_threshold=0)")
  if not 0 < c.temperature_min <= c.temperature_init <= 1:
    raise ValueError(
        "config.model needs 0 < temperature_min <= temperature_init <= 1; got "
        f"temperature_min={c.temperature_min}, temperature_init={c.temperature_init}")
