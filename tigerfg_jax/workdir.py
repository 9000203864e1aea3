"""Everything that reads or writes a run folder (a "workdir").

  WORKDIR/
    config.json        the resolved experiment config (`save_config` / `load_config`)
    tokenizer.json     the run's title tokenizer (`load_tokenizer`)
    checkpoints/N/     Orbax: `state` (step, params, optimizer state, PRNG key) and
                       `data` (the Grain iterator state as JSON), N = step
    init_params/       params to start from instead of a fresh init (the converter's)
    metrics.jsonl, tensorboard/   the training log (`training.metric_writer`)
    eval/              results.json and the embeddings of each eval split
    data/              the synthetic catalog, when the run has no `data.root`
    teacher/           the distill stage's own teacher run, when it trains one

WORKDIR may be a gs:// URL (`tigerfg_jax.runpath`): every file here goes through
`etils.epath`; `data/` (the synthetic catalog) then needs a local `data.root`.

A checkpoint restores exactly: its state into the shardings the config gives, and the
iterator state, so a restored run continues with the batches it would have seen. A
checkpoint of another shape is refused naming every mismatching array.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from tigerfg_jax import config_lib
from tigerfg_jax import runpath
from tigerfg_jax import sharding
from tigerfg_jax.data import catalog_root
from tigerfg_jax.data import pipeline
from tigerfg_jax.data import tokenizer as tokenizer_lib
from tigerfg_jax.data.tokenizer import TitleTokenizer, build_tokenizer
from tigerfg_jax.models import factory
from tigerfg_jax.models import towers

CONFIG_FILE = "config.json"
TOKENIZER_FILE = tokenizer_lib.FILE_NAME
CHECKPOINTS_DIR = "checkpoints"
INIT_PARAMS_DIR = "init_params"
EVAL_DIR = "eval"
RESULTS_FILE = "results.json"


CONFIG_CHANGES_FILE = "config_changes.jsonl"


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the model the config builds."""


class ResumeRefusedError(ValueError):
  """A run folder holds another run: keys that say what the run is have changed."""


# ----------------------------------------------------------------------- config ---

def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  runpath.path(workdir, CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))


# Keys added after runs were saved, and the value that reproduces what such a run did
# (not today's default): its ViT's position table was its item grid, its catalog had a
# quarter of train per eval split and 3 x 3 clutter, its student started from scratch
# and looked at each item once.
_SAVED_BEFORE = {
    ("model", "posemb_grid"): lambda s: s["data"]["item_image_size"] // s["model"]["patch_size"],
    ("data", "synthetic_eval_items"): lambda s: 0,
    ("data", "synthetic_clutter_grid"): lambda s: 3,
    ("teacher", "init_student"): lambda s: False,
    ("data", "device_augment"): lambda s: False,
    ("loss", "hard_negatives"): lambda s: 0,
    ("loss", "w_v2t"): lambda s: 0.0,
    ("loss", "v2t_query"): lambda s: False,
    ("loss", "w_i2v"): lambda s: 0.0,
    ("loss", "w_srd"): lambda s: 0.0,
    ("model", "zoom_threshold"): lambda s: 0.0,
    ("model", "zoom_refinements"): lambda s: 0,
}
# Keys that runs saved before they moved: their value's new place (None: dropped).
_MOVED = {
    ("eval", "every"): ("evals", "retrieval", "every"),
    ("loss", "w_infonce"): ("loss", "w_q2i"),
    ("loss", "w_sim"): ("loss", "w_sdd"),
    ("loss", "w_spatial"): ("loss", "w_spatial_map"),
    ("data", "mosaic_grid"): None,
}


def _upgrade(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config dict with the keys of older versions filled in or moved."""
  for (section, key), value in _SAVED_BEFORE.items():
    if section in saved and key not in saved[section]:
      saved[section][key] = value(saved)
  for (section, key), destination in _MOVED.items():
    if key in saved.get(section, {}):
      value = saved[section].pop(key)
      if destination is not None:
        node = saved
        for part in destination[:-1]:
          node = node.setdefault(part, {})
        node.setdefault(destination[-1], value)
  return saved


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's saved config. Keys added to the project since it was saved take the value
  that reproduces the saved run (`_SAVED_BEFORE`), others their defaults."""
  path = runpath.path(workdir, CONFIG_FILE)
  if not runpath.exists(workdir, CONFIG_FILE):
    raise FileNotFoundError(f"{path}: no saved config; is {workdir} a tigerfg_jax workdir?")
  saved = _upgrade(json.loads(path.read_text()))
  config = config_lib.experiment_config(saved["stage"], saved["preset"])
  config.update(saved)
  return config


# -------------------------------------------------------------- data, tokenizer ---

def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Raises a clear error when `workdir` cannot be a run folder.

  A URL workdir is created and probed (`runpath.check_writable`), and needs a local
  `data.root` (the synthetic catalog and the ArrayRecord cache are local folders).
  """
  if runpath.is_url(workdir):
    runpath.check_scheme(workdir, "--workdir")
    if not config.data.root:
      raise ValueError(f"--workdir={workdir}: a URL workdir needs a local dataset folder; "
                       "write the synthetic catalog with `python -m tigerfg_jax.data.synthetic "
                       "--out=DIR` and pass --config.data.root=DIR")
    runpath.check_writable(workdir, "--workdir")
    return
  if runpath.path(workdir).exists() and not runpath.path(workdir).is_dir():
    raise NotADirectoryError(f"--workdir={workdir} is a file, not a run folder; "
                             "choose another path")


def resume_changes(config: ml_collections.ConfigDict,
                   workdir: str) -> dict[str, tuple[Any, Any]]:
  """The changed keys `config` may bring to WORKDIR's run, which it resumes.

  {} when WORKDIR holds no checkpoint (a new run). Keys that say what the run is
  (anything outside `config_lib.RESUMABLE_KEYS`) are refused.

  Raises:
    ResumeRefusedError: one line per refused key with the run's and this value.
  """
  if (not runpath.path(workdir, CHECKPOINTS_DIR).is_dir()
      or checkpoint_manager(workdir).latest_step() is None):
    return {}
  changes = config_lib.changed_keys(load_config(workdir), config)
  refused = {k: v for k, v in changes.items() if not config_lib.is_resumable_change(k)}
  if refused:
    lines = [f"config.{key}: the run has {old!r}, this command {new!r}"
             for key, (old, new) in refused.items()]
    raise ResumeRefusedError(
        f"--workdir={workdir} holds a run with another config; resuming it would change "
        "what it is. Use a new --workdir, or drop these overrides:\n  " + "\n  ".join(lines))
  return changes


def write_run_files(config: ml_collections.ConfigDict, workdir: str,
                    tokenizer: TitleTokenizer, changes: dict[str, tuple[Any, Any]],
                    step: int) -> None:
  """Writes config.json and tokenizer.json, and records accepted `changes` at `step`.

  Called once the config, the data and any checkpoint have been checked, so a refused
  or failed start leaves the run folder as it was.
  """
  if jax.process_index() != 0:
    return
  runpath.path(workdir).mkdir(parents=True, exist_ok=True)
  save_config(config, workdir)
  if not runpath.path(workdir, TOKENIZER_FILE).exists():
    tokenizer.save(runpath.path(workdir, TOKENIZER_FILE))
  if changes:
    runpath.append_lines(runpath.path(workdir, CONFIG_CHANGES_FILE), [
        json.dumps({"step": step, "key": key, "old": old, "new": new}) + "\n"
        for key, (old, new) in changes.items()])


def data_root(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The run's dataset root: `data.root`, or its synthetic catalog in WORKDIR/data."""
  if not config.data.root:
    runpath.path(workdir).mkdir(parents=True, exist_ok=True)
  return catalog_root(config.data, workdir)


def _stored_sizes(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Images are cached at the sizes the run reads them (`ingest.stored_image`)."""
  return dict(item_size=config.data.item_image_size,
              query_size=config.data.query_image_size)


def load_split(config: ml_collections.ConfigDict, workdir: str, name: str,
               root: str | None = None, *, full_size: bool = False) -> pipeline.Split:
  """The validated split `name` of the run's dataset (or of `root`), ingested once.

  `full_size`: the files' own images (for figures) instead of the run's sizes.
  """
  root = root or data_root(config, workdir)
  sizes = {} if full_size else _stored_sizes(config)
  return pipeline.load_split(root, name, cache_dir=config.data.cache_dir,
                             skip_bad=config.data.skip_bad, **sizes)


def load_splits(config: ml_collections.ConfigDict, root: str) -> dict[str, pipeline.Split]:
  """`train` and every `eval*` split of `root`; one DatasetError lists all problems."""
  return pipeline.load_splits(root, cache_dir=config.data.cache_dir,
                              skip_bad=config.data.skip_bad, **_stored_sizes(config))


def load_tokenizer(workdir: str) -> TitleTokenizer:
  return TitleTokenizer.load(runpath.path(workdir, TOKENIZER_FILE))


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                  train_texts: list[str], teacher_dir: str | None) -> TitleTokenizer:
  """The run's title tokenizer (`write_run_files` saves it).

  A distilled run takes its teacher's (token ids must agree); a resumed run its own;
  a new run `data.tokenizer` or one trained on `train_texts` (the train titles, and
  text queries; `data.tokenizer.build_tokenizer`).
  """
  if teacher_dir is not None:
    return load_tokenizer(teacher_dir)
  if runpath.path(workdir, TOKENIZER_FILE).exists():
    return load_tokenizer(workdir)
  return build_tokenizer(config.data, train_texts)


# ------------------------------------------------------------------ checkpoints ---

def checkpoint_manager(workdir: str, keep: int = 1) -> ocp.CheckpointManager:
  """The Orbax manager of WORKDIR/checkpoints (created if missing; async saves)."""
  return ocp.CheckpointManager(
      runpath.absolute(workdir, CHECKPOINTS_DIR),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    data_state: dict[str, Any]) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def path_name(path: tuple[Any, ...]) -> str:
  """'a/b/c' for a pytree key path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def check_shapes(stored: Any, abstract: Any, where: str) -> None:
  """Raises CheckpointMismatchError naming every array whose shape differs or is missing."""
  stored_shapes = {path_name(p): tuple(m.shape)
                   for p, m in jax.tree_util.tree_leaves_with_path(stored)}
  wanted_shapes = {path_name(p): tuple(a.shape)
                   for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
  problems = [f"{name}: checkpoint has {stored_shapes[name]}, model expects {shape}"
              for name, shape in wanted_shapes.items()
              if name in stored_shapes and stored_shapes[name] != shape]
  problems += [f"{name}: missing from the checkpoint (model expects {shape})"
               for name, shape in wanted_shapes.items() if name not in stored_shapes]
  problems += [f"{name}: in the checkpoint but not in the model"
               for name in stored_shapes if name not in wanted_shapes]
  if problems:
    shown = "\n  ".join(problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise CheckpointMismatchError(
        f"checkpoint {where} does not match the configured model "
        f"({len(problems)} arrays differ):\n  {shown}{more}")


def restore_checkpoint(manager: ocp.CheckpointManager, step: int,
                       abstract_state: Any) -> tuple[Any, dict[str, Any]]:
  """Restores `(state, data_state)` at `step` into the shardings of `abstract_state`.

  `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` set.
  """
  stored = manager.item_metadata(step)["state"].tree
  check_shapes(stored, abstract_state, f"{manager.directory}/{step}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def save_init_params(workdir: str, params: Any) -> None:
  """Writes WORKDIR/init_params: the params a run on WORKDIR starts from at step 0."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(runpath.absolute(workdir, INIT_PARAMS_DIR), params)
  checkpointer.wait_until_finished()


def has_init_params(workdir: str) -> bool:
  return runpath.path(workdir, INIT_PARAMS_DIR).is_dir()


def restore_init_params(workdir: str, abstract_params: Any) -> Any:
  """WORKDIR/init_params into the shardings of `abstract_params` (shapes checked)."""
  directory = runpath.absolute(workdir, INIT_PARAMS_DIR)
  checkpointer = ocp.StandardCheckpointer()
  check_shapes(checkpointer.metadata(directory).item_metadata.tree, abstract_params,
               directory)
  return checkpointer.restore(directory, abstract_params)


def latest_params(workdir: str, abstract_params: Any) -> Any:
  """The params of WORKDIR's latest checkpoint (its `init_params` before any step).

  Reads only the `params` subtree: the optimizer state stays on disk.
  """
  directory = runpath.path(workdir, CHECKPOINTS_DIR)
  step = checkpoint_manager(workdir).latest_step() if directory.is_dir() else None
  if step is None:
    if has_init_params(workdir):
      return restore_init_params(workdir, abstract_params)
    raise FileNotFoundError(f"no checkpoint under {directory}")
  stored = checkpoint_manager(workdir).item_metadata(step)["state"].tree["params"]
  check_shapes(stored, abstract_params, f"{directory}/{step} (params)")
  state_dir = runpath.absolute(workdir, CHECKPOINTS_DIR, str(step), "state")
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding),
                              abstract_params)
  return ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item={"params": abstract_params}, restore_args={"params": restore_args},
      partial_restore=True))["params"]


# ---------------------------------------------------------------- trained runs ---

def load_run(workdir: str, mesh: jax.sharding.Mesh,
             vocab_size: int) -> tuple[towers.TigerFG, Any]:
  """A run's model (from its saved config) and its latest params, laid out on `mesh`."""
  run_config = load_config(workdir)
  model = factory.build_model(run_config, vocab_size)
  return model, latest_params(workdir, sharding.abstract_params(model, run_config, mesh))


def load_trained(workdir: str) -> tuple[ml_collections.ConfigDict, towers.TigerFG, Any,
                                        TitleTokenizer]:
  """(config, model, params, tokenizer) of a trained run (its latest checkpoint)."""
  config = load_config(workdir)
  tokenizer = load_tokenizer(workdir)
  model, params = load_run(workdir, sharding.make_mesh(config.mesh), tokenizer.vocab_size)
  return config, model, params, tokenizer
