"""Training and evaluation of one stage: `train_and_evaluate(config, workdir)`.

Reads top to bottom like big_vision's train.py: config checks, data, tokenizer, mesh and
shardings, model and optimizer, teacher, checkpoint restore, the jitted update step,
the train loop, the final evaluation. The `distill` stage trains its teacher first in
WORKDIR/teacher when `config.teacher.checkpoint` is not given.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tigerfg_jax import checkpointing
from tigerfg_jax import config_lib
from tigerfg_jax import evaluate
from tigerfg_jax import metric_writer
from tigerfg_jax import optim
from tigerfg_jax import sharding
from tigerfg_jax import train_step
from tigerfg_jax.data import catalog_root
from tigerfg_jax.data import folder
from tigerfg_jax.data import pipeline
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.models import towers

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


# ---------------------------------------------------------------------- config ---

def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


# Keys added after runs were saved, and the value that reproduces what such a run did
# (not today's default): its ViT's position table was its item grid, its catalog had a
# quarter of train per eval split and 3 x 3 clutter, its student started from scratch.
_SAVED_BEFORE = {
    ("model", "posemb_grid"): lambda s: s["data"]["item_image_size"] // s["model"]["patch_size"],
    ("data", "synthetic_eval_items"): lambda s: 0,
    ("data", "synthetic_clutter_grid"): lambda s: 3,
    ("teacher", "init_student"): lambda s: False,
}


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """A run's saved config. Keys added to the project since it was saved take the value
  that reproduces the saved run (`_SAVED_BEFORE`), others their defaults."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no saved config; is {workdir} a tigerfg_jax workdir?")
  with open(path) as f:
    saved = json.load(f)
  for (section, key), value in _SAVED_BEFORE.items():
    if section in saved and key not in saved[section]:
      saved[section][key] = value(saved)
  config = config_lib.experiment_config(saved["stage"], saved["preset"])
  config.update(saved)
  return config


def teacher_stage_config(config: ml_collections.ConfigDict,
                         data_root: str) -> ml_collections.ConfigDict:
  """The `teacher` stage with the model, data and mesh of a `distill` config."""
  teacher = config_lib.experiment_config("teacher", config.preset)
  teacher.seed = config.seed
  teacher.model = config.model.copy_and_resolve_references()
  teacher.data = config.data.copy_and_resolve_references()
  teacher.data.root = data_root
  teacher.mesh = config.mesh.copy_and_resolve_references()
  teacher.eval = config.eval.copy_and_resolve_references()
  teacher.train.steps = config.train.steps
  teacher.train.batch_size = config.train.batch_size
  return teacher


# ------------------------------------------------------------------------- data ---

def prepare_data(config: ml_collections.ConfigDict,
                 workdir: str) -> tuple[str, dict[str, pipeline.Split]]:
  """The dataset root and its validated splits (`train` and every `eval*` split).

  Process 0 writes the synthetic catalog (when no `data.root`) and the ArrayRecord
  cache first; the other processes wait for it, then read the same files. Every split
  is validated here, before any training.
  """
  def load():
    root = catalog_root(config.data, workdir)
    names = ["train", *folder.eval_splits(root)]
    return root, {name: pipeline.load_split(root, name,
                                            cache_dir=os.path.join(root, ".cache"),
                                            skip_bad=config.data.skip_bad)
                  for name in names}

  if jax.process_count() == 1:
    return load()
  if jax.process_index() == 0:
    load()
  multihost_utils.sync_global_devices("tigerfg_jax data prepared")
  return load()


# ------------------------------------------------------------------------ model ---

def model_for(config: ml_collections.ConfigDict, vocab_size: int) -> towers.TigerFG:
  model_config = config.model.copy_and_resolve_references()
  model_config.vocab_size = vocab_size
  return towers.TigerFG(ml_collections.FrozenConfigDict(model_config))


def dummy_batch(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, Any]:
  """Shape-only stand-in of a training batch (ARCHITECTURE.md) for init/eval_shape."""
  item, query = config.data.item_image_size, config.data.query_image_size
  num_patches = (item // config.model.patch_size) ** 2
  length = config.model.max_title_len
  return {
      "query_image": jnp.zeros((batch_size, query, query, 3), jnp.uint8),
      "item_image": jnp.zeros((batch_size, item, item, 3), jnp.uint8),
      "title_tokens": jnp.zeros((batch_size, length), jnp.int32),
      "title_mask": jnp.ones((batch_size, length), bool),
      "box": jnp.zeros((batch_size, 4), jnp.float32),
      "has_box": jnp.zeros((batch_size,), bool),
      "spatial_target": jnp.full((batch_size, num_patches), 1 / num_patches, jnp.float32),
      "group": jnp.arange(batch_size, dtype=jnp.int32),
  }


def abstract_params(model: nn.Module, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
  """(boxed abstract variables, NamedShardings of the unboxed params) without allocating."""
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy_batch(config, 2)))
  shardings = sharding.param_shardings(boxed, mesh, config.mesh.param_sharding)
  return boxed, shardings["params"]


def with_shardings(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


# ---------------------------------------------------------------------- teacher ---

def needs_teacher(config: ml_collections.ConfigDict) -> bool:
  loss = config.loss
  return config.stage == "distill" and (
      config.teacher.init_student or loss.w_sim > 0
      or (loss.w_spatial > 0 and loss.spatial_target == "teacher"))


def student_from_teacher(state: train_step.TrainState, teacher_params: Any,
                         teacher_dir: str) -> train_step.TrainState:
  """A fresh student `state` holding a copy of the teacher's weights.

  Stage 2 starts where stage 1 ended (`config.teacher.init_student`); the optimizer
  state stays fresh. The two models must have one parameter layout (the teacher stage
  copies the student's `config.model`). Copied, not aliased: the update step donates
  the student's buffers while the frozen teacher keeps using its own.
  """
  def shapes(tree):
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  student, teacher = shapes(state.params), shapes(teacher_params)
  problems = [f"{name}: student {shape}, teacher {teacher.get(name, 'missing')}"
              for name, shape in student.items() if teacher.get(name) != shape]
  problems += [f"{name}: only in the teacher" for name in teacher if name not in student]
  if problems:
    raise ValueError(
        f"config.teacher.init_student: the teacher {teacher_dir} has another parameter "
        "layout than the student (train it with this config.model, or set "
        "teacher.init_student=False):\n  " + "\n  ".join(problems[:10]))
  shardings = jax.tree.map(lambda a: a.sharding, state.params)
  params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(
      teacher_params)
  return state.replace(params=params)


def load_run(workdir: str, mesh: jax.sharding.Mesh,
             vocab_size: int) -> tuple[towers.TigerFG, Any]:
  """A run's model (from its saved config) and its latest params (e.g. a teacher)."""
  run_config = load_config(workdir)
  model = model_for(run_config, vocab_size)
  boxed, param_shardings = abstract_params(model, run_config, mesh)
  abstract = with_shardings(nn.meta.unbox(boxed)["params"], param_shardings)
  params = checkpointing.restore_params(os.path.join(workdir, "checkpoints"), abstract)
  return model, params


def load_trained(workdir: str) -> tuple[towers.TigerFG, Any, TitleTokenizer]:
  """(model, params, tokenizer) of a trained run's workdir (its latest checkpoint)."""
  tokenizer = TitleTokenizer.load(os.path.join(workdir, TOKENIZER_FILE))
  mesh = sharding.make_mesh(load_config(workdir).mesh)
  model, params = load_run(workdir, mesh, tokenizer.vocab_size)
  return model, params, tokenizer


def resolve_teacher(config: ml_collections.ConfigDict, workdir: str, data_root: str) -> str:
  """A teacher workdir: the configured one, or WORKDIR/teacher trained now."""
  if config.teacher.checkpoint:
    return config.teacher.checkpoint
  teacher_dir = os.path.join(workdir, "teacher")
  if os.path.exists(os.path.join(teacher_dir, "eval", "results.json")):
    return teacher_dir
  logging.info("No teacher.checkpoint: training the teacher stage in %s", teacher_dir)
  train_and_evaluate(teacher_stage_config(config, data_root), teacher_dir)
  return teacher_dir


def title_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                    train_titles: list[str], teacher_dir: str | None) -> TitleTokenizer:
  """The teacher's tokenizer when distilling (ids must agree), else this run's own."""
  own = os.path.join(workdir, TOKENIZER_FILE)
  if teacher_dir is not None:
    tokenizer = TitleTokenizer.load(os.path.join(teacher_dir, TOKENIZER_FILE))
  elif os.path.exists(own):
    tokenizer = TitleTokenizer.load(own)
  elif config.data.tokenizer:
    tokenizer = TitleTokenizer.load(config.data.tokenizer)
  else:
    tokenizer = TitleTokenizer.train(train_titles, config.data.vocab_size)
  if jax.process_index() == 0 and not os.path.exists(own):
    tokenizer.save(own)
  return tokenizer


# ------------------------------------------------------------------- trainer ---

@dataclasses.dataclass(frozen=True)
class Trainer:
  """The jitted pieces of one stage, with their shardings.

  init: `(rng) -> TrainState`, laid out by `abstract_state`'s shardings.
  update: `(state, teacher_params, batch) -> (state, measurements)`; donates `state`.
  """
  model: towers.TigerFG
  abstract_state: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Callable[[jax.Array], train_step.TrainState]
  update: Callable[..., Any]


def make_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 vocab_size: int, teacher_model: towers.TigerFG | None = None,
                 teacher_params: Any = None) -> Trainer:
  """Builds the model, optimizer, state shardings and the jitted init/update."""
  model = model_for(config, vocab_size)
  optimizer = optim.make_optimizer(config.train)
  _, param_shardings = abstract_params(model, config, mesh)
  repl = sharding.replicated(mesh)

  def init_state(rng):
    params = nn.meta.unbox(model.init(rng, dummy_batch(config, 2)))["params"]
    return train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=optimizer.init(params),
                                 rng=jax.random.fold_in(rng, 1))

  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_shardings = jax.tree.map(lambda _: repl, abstract_state).replace(
      params=param_shardings,
      opt_state=optim.opt_state_shardings(optimizer, abstract_state.opt_state,
                                          param_shardings, repl))
  teacher_shardings = (None if teacher_params is None
                       else jax.tree.map(lambda a: a.sharding, teacher_params))
  loss_fn = train_step.make_loss_fn(model, teacher_model, config.stage, config.loss)
  batch_sharding = sharding.batch_sharding(mesh)
  update = jax.jit(train_step.make_update_fn(loss_fn, optimizer),
                   in_shardings=(state_shardings, teacher_shardings, batch_sharding),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,))
  return Trainer(model=model,
                 abstract_state=with_shardings(abstract_state, state_shardings),
                 batch_sharding=batch_sharding,
                 init=jax.jit(init_state, out_shardings=state_shardings),
                 update=update)


# ------------------------------------------------------------------- the stage ---

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, Any] | None:
  """Trains `config.stage` in `workdir` (resuming if it holds a checkpoint), evaluates.

  Args:
    config: an experiment config (`config_lib.experiment_config`).
    workdir: output folder (DESIGN.md section 8 lists what it holds).
    stop_after: leave after this many steps in this call (as a preempted job would),
      with a checkpoint written; the next call resumes. None: run to the end.

  Returns:
    `{split: metrics}` from the final evaluation, or None when stopped early.
  """
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  batch_size = config.train.batch_size
  if batch_size % mesh.shape["data"] or batch_size % jax.process_count():
    raise ValueError(
        f"config.train.batch_size={batch_size} must be divisible by the 'data' mesh "
        f"axis ({mesh.shape['data']} devices) and the {jax.process_count()} processes")
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    save_config(config, workdir)

  # --- data and tokenizer ---
  data_root, splits = prepare_data(config, workdir)
  teacher_dir = resolve_teacher(config, workdir, data_root) if needs_teacher(config) else None
  tokenizer = title_tokenizer(config, workdir, splits["train"].titles, teacher_dir)

  # --- model, optimizer, teacher ---
  teacher_model, teacher_params = None, None
  if teacher_dir is not None:
    teacher_model, teacher_params = load_run(teacher_dir, mesh, tokenizer.vocab_size)
  trainer = make_trainer(config, mesh, tokenizer.vocab_size, teacher_model, teacher_params)

  # --- input pipeline and checkpoint restore ---
  train_iter = pipeline.train_iterator(
      splits["train"], tokenizer, config.data, batch_size=batch_size,
      patch_size=config.model.patch_size, max_title_len=config.model.max_title_len,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count())
  manager = checkpointing.make_manager(os.path.join(workdir, "checkpoints"),
                                       config.train.keep_checkpoints)
  if manager.latest_step() is not None:
    step0 = manager.latest_step()
    logging.info("Resuming from %s/%d", manager.directory, step0)
    state, data_state = checkpointing.restore(manager, step0, trainer.abstract_state)
    train_iter.set_state(data_state)
  else:
    state = trainer.init(jax.random.PRNGKey(config.seed))
    if config.teacher.init_student:
      state = student_from_teacher(state, teacher_params, teacher_dir)

  # --- train loop ---
  total = config.train.steps
  first = int(state.step)
  last = total if stop_after is None else min(total, first + stop_after)
  writer = metric_writer.MetricWriter(workdir)
  timer = metric_writer.StepTimer(first, total, batch_size)
  for step in range(first + 1, last + 1):
    batch = sharding.global_batch(next(train_iter), trainer.batch_sharding)
    state, measurements = trainer.update(state, teacher_params, batch)
    is_log = step % config.train.log_every == 0 or step == last
    is_ckpt = step % config.train.checkpoint_every == 0 or step == last
    if is_log or is_ckpt:
      scalars = {k: float(v) for k, v in jax.device_get(measurements).items()}
      if not np.isfinite(scalars["loss"]):
        manager.wait_until_finished()
        raise NonFiniteLossError(
            f"loss is {scalars['loss']} at step {step} ({scalars}); stopping. The last "
            f"good checkpoint is step {manager.latest_step()} in {manager.directory}")
      scalars.update(timer.tick(step))
      if is_log:
        writer.write(step, scalars)
        metric_writer.log_progress(step, total, scalars)
    if is_ckpt:
      checkpointing.save(manager, step, state, train_iter.get_state())
  manager.wait_until_finished()
  writer.close()
  if last < total:
    return None

  # --- evaluation ---
  eval_splits = {name: split for name, split in splits.items() if name != "train"}
  return evaluate.evaluate_all(trainer.model, state.params, tokenizer, eval_splits, config,
                               mesh, workdir)
