r"""Exports a trained run for serving without the training code.

  python -m tigerfg_jax.export --workdir=DIR --out=EXPORT [--split=eval_cluttered] \
      [--data_root=ROOT] [--platforms=cpu,cuda,tpu]

Restores the params of the latest checkpoint in DIR/checkpoints and writes EXPORT/ in
the layout of `tigerfg_jax.exported` (which loads it): both towers serialized with
`jax.export` (StableHLO, batch dimension symbolic, params baked in as constants,
lowered for every platform in --platforms so an export made on a CPU host serves on
GPU/TPU), the tokenizer, the config, the preprocessing parameters, and the catalog:
the item embeddings of one split with their ids and titles in a ScaNN index.

The catalog is the split --split of the run's dataset (the run's `data.root`, or
DIR/data for the synthetic catalog; --data_root overrides). Every eval split is its own
catalog (DESIGN.md section 1); the default is `eval_cluttered`, the setting TIGER-FG is
built for (the titled product among distractors). Its embeddings come from the
evaluator's own functions, so they equal DIR/eval/<split>_item_emb.npy. Single-process.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags
from jax import export as jax_export

from tigerfg_jax import checkpointing
from tigerfg_jax import evaluate
from tigerfg_jax import exported
from tigerfg_jax import index as index_lib
from tigerfg_jax import sharding
from tigerfg_jax import train
from tigerfg_jax.data import catalog_root, folder, pipeline
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.models import towers

DEFAULT_SPLIT = "eval_cluttered"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def export_encoders(model: towers.TigerFG, params: Any, config: ml_collections.ConfigDict,
                    platforms: Sequence[str]) -> dict[str, jax_export.Exported]:
  """`jax.export` modules of the query and item towers, by export file name.

  The evaluator's embedding functions are exported on a one-device mesh with host
  copies of `params`, which become constants of the module. Inputs: uint8
  `[b, Sq, Sq, 3]` (query); uint8 `[b, Si, Si, 3]`, int32 `[b, L]`, bool `[b, L]`
  (item), with `b` symbolic. Output: float32 `[b, E]`.
  """
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                                 sharding.MESH_AXES)
  embed_query, embed_item = evaluate.make_embed_fns(model, one_device)
  host_params = jax.device_get(params)
  embed_query = jax.jit(functools.partial(embed_query, host_params))
  embed_item = jax.jit(functools.partial(embed_item, host_params))
  b, = jax_export.symbolic_shape("b")
  query, item = config.data.query_image_size, config.data.item_image_size
  length = config.model.max_title_len
  query_args = (jax.ShapeDtypeStruct((b, query, query, 3), jnp.uint8),)
  item_args = (jax.ShapeDtypeStruct((b, item, item, 3), jnp.uint8),
               jax.ShapeDtypeStruct((b, length), jnp.int32),
               jax.ShapeDtypeStruct((b, length), jnp.bool_))
  return {
      exported.QUERY_ENCODER: jax_export.export(embed_query, platforms=platforms)(*query_args),
      exported.ITEM_ENCODER: jax_export.export(embed_item, platforms=platforms)(*item_args),
  }


def catalog_embeddings(model: towers.TigerFG, params: Any, tokenizer: TitleTokenizer,
                       split: pipeline.Split, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> np.ndarray:
  """float32 `[M, E]` item embeddings of `split`, computed as the evaluator does."""
  _, embed_item = evaluate.make_embed_fns(model, mesh)
  batches = pipeline.eval_item_batches(split, tokenizer, config.data,
                                       batch_size=config.eval.batch_size,
                                       max_title_len=config.model.max_title_len)
  return evaluate.embed_batches(functools.partial(embed_item, params), batches,
                                ("item_image", "title_tokens", "title_mask"),
                                split.num_items, mesh, f"{split.name} items")


def load_catalog_split(config: ml_collections.ConfigDict, workdir: str, split_name: str,
                       data_root: str | None) -> pipeline.Split:
  """The validated catalog split, or a clear error listing the splits there are."""
  root = data_root or catalog_root(config.data, workdir)
  if not os.path.isdir(os.path.join(root, split_name)):
    available = folder.eval_splits(root) if os.path.isdir(root) else []
    raise ValueError(f"--split={split_name!r}: no folder {os.path.join(root, split_name)}; "
                     f"the eval splits of {root} are {available}")
  return pipeline.load_split(root, split_name, cache_dir=os.path.join(root, ".cache"),
                             skip_bad=config.data.skip_bad)


def _git_commit() -> str | None:
  """The commit of the tigerfg_jax checkout this runs from, if it is a git checkout."""
  try:
    result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)), check=False)
  except OSError:
    return None
  return result.stdout.strip() if result.returncode == 0 else None


def _versions() -> dict[str, str | None]:
  versions: dict[str, str | None] = {
      name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "scann")}
  versions["tigerfg_jax_commit"] = _git_commit()
  return versions


def export_run(workdir: str, out: str, *, split: str = DEFAULT_SPLIT,
               data_root: str | None = None,
               platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, Any]:
  """Writes the export of the run in `workdir` to `out` (which must not exist).

  The export is assembled in a hidden folder beside `out` and renamed into place, so
  `out` never holds a partial export. Returns the manifest.
  """
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} already exists; choose a new folder or delete it")
  config = train.load_config(workdir)
  catalog = load_catalog_split(config, workdir, split, data_root)
  tokenizer = TitleTokenizer.load(os.path.join(workdir, train.TOKENIZER_FILE))
  mesh = sharding.make_mesh(config.mesh)
  model, params = train.load_run(workdir, mesh, tokenizer.vocab_size)
  step = checkpointing.make_manager(os.path.join(workdir, "checkpoints")).latest_step()
  item_emb = catalog_embeddings(model, params, tokenizer, catalog, config, mesh)
  encoders = export_encoders(model, params, config, platforms)

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
  os.makedirs(tmp)
  try:
    for name, encoder in encoders.items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(encoder.serialize())
    for name in (train.TOKENIZER_FILE, train.CONFIG_FILE):
      shutil.copyfile(os.path.join(workdir, name), os.path.join(tmp, name))
    with open(os.path.join(tmp, exported.PREPROCESSING), "w", encoding="utf-8") as f:
      json.dump({
          "query_image_size": config.data.query_image_size,
          "item_image_size": config.data.item_image_size,
          "max_title_len": config.model.max_title_len,
          "embed_dim": config.model.embed_dim,
          "image_resize": "decode to RGB, squash to S x S, bilinear "
                          "(tigerfg_jax.data.augment.resize)",
          "pixel_normalisation": "inside the encoders (uint8 0..255 in)",
          "catalog_split": split,
      }, f, indent=2)
    exported.write_catalog(tmp, catalog.item_ids, catalog.titles)
    index_lib.build(item_emb, catalog.item_ids, config.eval, backend="scann").save(
        os.path.join(tmp, exported.INDEX_DIR))
    manifest = exported.write_manifest(tmp, {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source": {"workdir": os.path.abspath(workdir), "checkpoint_step": step,
                   "catalog_split": split, "num_items": catalog.num_items},
        "versions": _versions(),
        "encoders": {"platforms": list(platforms),
                     "calling_convention_version":
                         encoders[exported.QUERY_ENCODER].calling_convention_version},
    })
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    manifest = export_run(FLAGS.workdir, FLAGS.out, split=FLAGS.split,
                          data_root=FLAGS.data_root, platforms=FLAGS.platforms)
  except (OSError, ValueError) as e:
    sys.exit(f"export: error: {e}")
  print(f"wrote {FLAGS.out}: {manifest['source']['num_items']} catalog items of "
        f"{manifest['source']['catalog_split']}, {len(manifest['files'])} files")


if __name__ == "__main__":
  # Flags are defined here, not at import, so that importing this module next to
  # another entry point (tigerfg_jax.main also has --workdir) defines nothing twice.
  flags.DEFINE_string("workdir", None, "Workdir of a trained run.", required=True)
  flags.DEFINE_string("out", None, "Export directory to create (must not exist).",
                      required=True)
  flags.DEFINE_string("split", DEFAULT_SPLIT, "Split whose items form the catalog.")
  flags.DEFINE_string("data_root", None, "Dataset root holding --split (default: the "
                      "run's data.root, or WORKDIR/data for the synthetic catalog).")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "Platforms the encoders are lowered for.")
  FLAGS = flags.FLAGS
  app.run(main)
