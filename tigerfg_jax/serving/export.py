r"""Exports a trained run for serving without the training code.

  python -m tigerfg_jax.serving.export --workdir=DIR --out=EXPORT \
      [--split=eval_cluttered] [--data_root=ROOT] [--platforms=cpu,cuda,tpu]

Restores the params of the latest checkpoint in DIR/checkpoints and writes EXPORT/ in
the layout of `tigerfg_jax.serving.artifact` (which loads it): the encoders (item, image
query and/or text query) serialized with
`jax.export` (StableHLO, batch dimension symbolic, params baked in as constants,
lowered for every platform in --platforms so an export made on a CPU host serves on
GPU/TPU), the tokenizer, the config, the preprocessing parameters, and the catalog:
the item embeddings of one split with their ids and titles in a ScaNN index.

The catalog is the split --split of the run's dataset (the run's `data.root`, or
DIR/data for the synthetic catalog; --data_root overrides). Every eval split is its own
catalog; the default is `eval_cluttered`, the setting TIGER-FG is
built for (the titled product among distractors). Its embeddings come from the
evaluator's own functions, so they equal DIR/eval/<split>_item_emb.npy. Single-process.

DIR and EXPORT may be gs:// URLs (`tigerfg_jax.runpath`; the catalog's dataset is
local): a URL EXPORT is assembled in a local temporary folder, then copied there.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from jax import export as jax_export

from tigerfg_jax import cli
from tigerfg_jax import index as index_lib
from tigerfg_jax import runpath
from tigerfg_jax import sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import folder, pipeline
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.evaluation import encoders, retrieval
from tigerfg_jax.models import factory, towers
from tigerfg_jax.serving import artifact

DEFAULT_SPLIT = "eval_cluttered"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def export_encoders(model: towers.TigerFG, params: Any, config: ml_collections.ConfigDict,
                    platforms: Sequence[str]) -> dict[str, jax_export.Exported]:
  """`jax.export` modules of the run's encoders, by export file name.

  The evaluator's embedding functions are exported on a one-device mesh with host
  copies of `params`, which become constants of the module. The item encoder always:
  uint8 `[b, Si, Si, 3]`, int32 `[b, L]`, bool `[b, L]` -> float32 `[b, E']`; the image
  query encoder (uint8 `[b, Sq, Sq, 3]`) when the run trains image queries (not the
  text_query stage); the text query encoder (int32 `[b, Lq]`, bool `[b, Lq]`) when the
  model has one. `b` is symbolic; E' = 2E for the 'smar' fusion, else E.
  """
  one_device = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                                 sharding.MESH_AXES)
  embed_query, embed_item = encoders.make_embed_fns(model, one_device)
  fns = {artifact.ITEM_ENCODER: (embed_item, retrieval.ITEM_KEYS)}
  if config.stage != "text_query":
    fns[artifact.QUERY_ENCODER] = (embed_query, retrieval.QUERY_KEYS)
  if config.model.text_query_encoder != "none":
    fns[artifact.TEXT_QUERY_ENCODER] = (encoders.make_text_embed_fn(model, one_device),
                                        retrieval.TEXT_KEYS)
  host_params = jax.device_get(params)
  b, = jax_export.symbolic_shape("b")
  inputs = factory.dummy_batch(config, 1)
  return {
      name: jax_export.export(jax.jit(functools.partial(fn, host_params)),
                              platforms=platforms)(
          *[jax.ShapeDtypeStruct((b, *inputs[k].shape[1:]), inputs[k].dtype)
            for k in keys])
      for name, (fn, keys) in fns.items()}


def catalog_embeddings(model: towers.TigerFG, params: Any, tokenizer: TitleTokenizer,
                       split: pipeline.Split, config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> np.ndarray:
  """float32 `[M, E]` item embeddings of `split`, computed as the evaluator does."""
  embed_query, embed_item = encoders.make_embed_fns(model, mesh)
  item_emb, _ = retrieval.embed_split(split, params, embed_query, embed_item, tokenizer,
                                      config, encoders.mesh_placer(mesh), queries=False)
  return item_emb


def load_catalog_split(config: ml_collections.ConfigDict, workdir: str, split_name: str,
                       data_root: str | None) -> pipeline.Split:
  """The validated catalog split, or a clear error listing the splits there are."""
  root = data_root or workdir_lib.data_root(config, workdir)
  if not os.path.isdir(os.path.join(root, split_name)):
    available = folder.eval_splits(root) if os.path.isdir(root) else []
    raise ValueError(f"--split={split_name!r}: no folder {os.path.join(root, split_name)}; "
                     f"the eval splits of {root} are {available}")
  return workdir_lib.load_split(config, workdir, split_name, root)


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
  `out` never holds a partial export; a URL `out` is assembled in a local temporary
  folder and copied there at the end. Returns the manifest.
  """
  if runpath.exists(out, what="--out"):
    raise FileExistsError(f"--out={out} already exists; choose a new folder or delete it")
  runpath.check_writable(out, "--out")
  config = workdir_lib.load_config(workdir)
  catalog = load_catalog_split(config, workdir, split, data_root)
  tokenizer = workdir_lib.load_tokenizer(workdir)
  mesh = sharding.make_mesh(config.mesh)
  model, params = workdir_lib.load_run(workdir, mesh, tokenizer.vocab_size)
  step = workdir_lib.checkpoint_manager(workdir).latest_step()
  item_emb = catalog_embeddings(model, params, tokenizer, catalog, config, mesh)
  encoders = export_encoders(model, params, config, platforms)

  if runpath.is_url(out):
    with tempfile.TemporaryDirectory() as local:
      manifest = export_run(workdir, os.path.join(local, "export"), split=split,
                            data_root=data_root, platforms=platforms)
      _copy_tree(os.path.join(local, "export"), runpath.path(out))
    return manifest
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.tmp-{os.getpid()}")
  os.makedirs(tmp)
  try:
    for name, encoder in encoders.items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(encoder.serialize())
    for name in (workdir_lib.TOKENIZER_FILE, workdir_lib.CONFIG_FILE):
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(runpath.path(workdir, name).read_bytes())
    with open(os.path.join(tmp, artifact.PREPROCESSING), "w", encoding="utf-8") as f:
      json.dump({
          "query_image_size": config.data.query_image_size,
          "item_image_size": config.data.item_image_size,
          "max_title_len": config.model.max_title_len,
          "max_query_len": config.model.max_query_len,
          "embed_dim": int(item_emb.shape[1]),
          "image_resize": "decode to RGB, squash to S x S, bilinear "
                          "(tigerfg_jax.data.augment.resize)",
          "pixel_normalisation": "inside the encoders (uint8 0..255 in)",
          "catalog_split": split,
      }, f, indent=2)
    artifact.write_catalog(tmp, catalog.item_ids, catalog.titles)
    index_lib.build(item_emb, catalog.item_ids, config.eval, backend="scann").save(
        os.path.join(tmp, artifact.INDEX_DIR))
    manifest = artifact.write_manifest(tmp, {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "source": {"workdir": str(runpath.absolute(workdir)), "checkpoint_step": step,
                   "catalog_split": split, "num_items": catalog.num_items},
        "versions": _versions(),
        "encoders": {"platforms": list(platforms),
                     "calling_convention_version":
                         encoders[artifact.ITEM_ENCODER].calling_convention_version},
    })
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _copy_tree(local: str, target: epath.Path) -> None:
  """Copies the local folder `local` into the epath folder `target`, file by file."""
  for parent, _, names in os.walk(local):
    folder = target / os.path.relpath(parent, local)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
      with open(os.path.join(parent, name), "rb") as f:
        (folder / name).write_bytes(f.read())


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Workdir of a trained run.", required=True)
  flags.DEFINE_string("out", None, "Export directory to create (must not exist).",
                      required=True)
  flags.DEFINE_string("split", DEFAULT_SPLIT, "Split whose items form the catalog.")
  flags.DEFINE_string("data_root", None, "Dataset root holding --split (default: the "
                      "run's data.root, or WORKDIR/data for the synthetic catalog).")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "Platforms the encoders are lowered for.")


def main(argv):
  cli.no_arguments(argv)
  args = flags.FLAGS
  manifest = export_run(args.workdir, args.out, split=args.split,
                        data_root=args.data_root, platforms=args.platforms)
  print(f"wrote {args.out}: {manifest['source']['num_items']} catalog items of "
        f"{manifest['source']['catalog_split']}, {len(manifest['files'])} files")


def run() -> None:
  cli.run(main, define_flags, "tigerfg-export")


if __name__ == "__main__":
  run()
