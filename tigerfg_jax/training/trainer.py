"""Training and evaluation of one stage: `train_and_evaluate(config, workdir)`.

Reads top to bottom like big_vision's train.py: config checks, data, tokenizer, mesh and
shardings, model and optimizer, teacher, checkpoint restore, the jitted update step,
the train loop with its evaluators (`config.evals`). The `distill` stage trains its
teacher first in WORKDIR/teacher when `config.teacher.checkpoint` is not given.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tigerfg_jax import config_lib
from tigerfg_jax import runpath
from tigerfg_jax import sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.data import device_augment
from tigerfg_jax.data import pipeline
from tigerfg_jax.evaluation import evaluators
from tigerfg_jax.models import factory
from tigerfg_jax.models import patch_teacher as patch_teacher_lib
from tigerfg_jax.models import towers
from tigerfg_jax.training import flops
from tigerfg_jax.training import metric_writer
from tigerfg_jax.training import optim
from tigerfg_jax.training import prefetch
from tigerfg_jax.training import preemption
from tigerfg_jax.training import step as step_lib


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def teacher_stage_config(config: ml_collections.ConfigDict,
                         data_root: str) -> ml_collections.ConfigDict:
  """The `teacher` stage with the model, data and mesh of a `distill` (or `text_query`)
  config; its item tower is TIGER-FG's whatever the student's item fusion."""
  teacher = config_lib.experiment_config("teacher", config.preset)
  teacher.seed = config.seed
  teacher.model = config.model.copy_and_resolve_references()
  teacher.model.item_fusion = "tiger"  # the text_query stage's other fusions start from it.
  teacher.model.zoom_threshold = 0.0    # its items are the target crops already.
  for key in ("vision_variant", "text_variant"):
    if config.teacher[key]:
      teacher.model[key] = config.teacher[key]
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
    root = workdir_lib.data_root(config, workdir)
    return root, workdir_lib.load_splits(config, root)

  if jax.process_count() == 1:
    return load()
  if jax.process_index() == 0:
    load()
  multihost_utils.sync_global_devices("tigerfg_jax data prepared")
  return load()


# ---------------------------------------------------------------------- teacher ---

def needs_teacher(config: ml_collections.ConfigDict) -> bool:
  """Whether the stage loads a teacher run (to start from it or for a loss term)."""
  views = step_lib.teacher_views(config.loss, bool(config.teacher.patch_teacher))
  if config.stage == "text_query":
    return config.teacher.init_student
  return config.stage == "distill" and (config.teacher.init_student or any(views.values()))


def needs_target_crops(config: ml_collections.ConfigDict) -> bool:
  """Whether batches carry the ground-truth crops (`target_image`)."""
  return (config.stage == "teacher"
          or (config.stage == "distill"
              and step_lib.teacher_views(config.loss, True)["crop"]))


def tokenizer_texts(config: ml_collections.ConfigDict,
                    splits: dict[str, pipeline.Split]) -> list[str]:
  """What a new run's tokenizer is trained on: the train titles, and the train text
  queries when the model has a text query tower (their words are the queries')."""
  texts = list(splits["train"].titles)
  if config.model.text_query_encoder != "none":
    texts += splits["train"].text_queries
  return texts


def student_from_teacher(state: step_lib.TrainState, teacher_params: Any,
                         teacher_dir: str, *, shared_only: bool = False
                         ) -> step_lib.TrainState:
  """A fresh student `state` holding a copy of the teacher's weights.

  Stage 2 starts where stage 1 ended (`config.teacher.init_student`); the optimizer
  state stays fresh. The two models must have one parameter layout (the teacher stage
  copies the student's `config.model`), except with `shared_only` (the text_query
  stage, whose item fusion may have other layers): then every parameter the teacher
  has at the same path and shape is copied (the ViT, the title encoder, ...), the
  others keep their initial values, and the ViT must be among the copied. Copied, not
  aliased: the update step donates the student's buffers while the frozen teacher keeps
  using its own.
  """
  def shapes(tree):
    return {jax.tree_util.keystr(path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  student, teacher = shapes(state.params), shapes(teacher_params)
  problems = [f"{name}: student {shape}, teacher {teacher.get(name, 'missing')}"
              for name, shape in student.items() if teacher.get(name) != shape]
  if shared_only:
    problems = [p for p in problems if p.startswith("['vision']")]
  else:
    problems += [f"{name}: only in the teacher" for name in teacher if name not in student]
  if problems:
    raise ValueError(
        f"config.teacher.init_student: the teacher {teacher_dir} has another parameter "
        "layout than the student (train it with this config.model, or set "
        "teacher.init_student=False):\n  " + "\n  ".join(problems[:10]))
  shardings = jax.tree.map(lambda a: a.sharding, state.params)
  teacher_leaves = {jax.tree_util.keystr(path): leaf for path, leaf
                    in jax.tree_util.tree_flatten_with_path(teacher_params)[0]}

  def pick(path, own):
    name = jax.tree_util.keystr(path)
    return teacher_leaves[name] if teacher.get(name) == student[name] else own

  params = jax.tree_util.tree_map_with_path(pick, state.params)
  if shared_only:
    logging.info("Student from %s: %d of %d parameter arrays copied, the rest fresh",
                 teacher_dir, sum(teacher.get(n) == s for n, s in student.items()),
                 len(student))
  params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)
  return state.replace(params=params)


def resolve_teacher(config: ml_collections.ConfigDict, workdir: str, data_root: str) -> str:
  """A teacher workdir: the configured one, or WORKDIR/teacher trained now."""
  if config.teacher.checkpoint:
    return config.teacher.checkpoint
  teacher_dir = str(runpath.path(workdir, "teacher"))
  wanted = teacher_stage_config(config, data_root)
  if runpath.path(teacher_dir, workdir_lib.EVAL_DIR, workdir_lib.RESULTS_FILE).exists():
    check_teacher_matches(wanted, teacher_dir)
    return teacher_dir
  logging.info("No teacher.checkpoint: training the teacher stage in %s", teacher_dir)
  train_and_evaluate(wanted, teacher_dir)
  return teacher_dir


def check_teacher_matches(wanted: ml_collections.ConfigDict, teacher_dir: str) -> None:
  """Refuses a finished WORKDIR/teacher trained with another model, data or objective.

  Raises:
    workdir.ResumeRefusedError: one line per changed key, and what to do.
  """
  changed = {key: values for key, values in config_lib.changed_keys(
      workdir_lib.load_config(teacher_dir), wanted).items()
             if not config_lib.is_resumable_change(key)}
  if changed:
    raise workdir_lib.ResumeRefusedError(
        f"{teacher_dir} holds a teacher trained with another config than this run's "
        "teacher stage; delete that folder to retrain it, or pass it as "
        "--config.teacher.checkpoint to use it anyway:\n  " + "\n  ".join(
            f"config.{key}: {old!r} (teacher) vs {new!r} (this run)"
            for key, (old, new) in changed.items()))


# ------------------------------------------------------------------- trainer ---

@dataclasses.dataclass(frozen=True)
class Trainer:
  """The jitted pieces of one stage, with their shardings.

  init: `(rng) -> TrainState`, laid out by `abstract_state`'s shardings.
  update: `(state, frozen, batch) -> (state, measurements)`; donates `state`.
  """
  model: towers.TigerFG
  abstract_state: Any
  batch_sharding: jax.sharding.NamedSharding
  init: Callable[[jax.Array], step_lib.TrainState]
  update: Callable[..., Any]


def make_trainer(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 vocab_size: int, teacher_model: towers.TigerFG | None = None,
                 frozen: Any = None) -> Trainer:
  """Builds the model, optimizer, state shardings and the jitted init/update."""
  model = factory.build_model(config, vocab_size)
  optimizer = optim.make_optimizer(config.train)
  param_shardings = jax.tree.map(lambda a: a.sharding,
                                 sharding.abstract_params(model, config, mesh))
  repl = sharding.replicated(mesh)

  def init_state(rng):
    params = nn.meta.unbox(model.init(rng, factory.dummy_batch(config, 2)))["params"]
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=optimizer.init(params),
                                 rng=jax.random.fold_in(rng, 1))

  abstract_state = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  state_shardings = jax.tree.map(lambda _: repl, abstract_state).replace(
      params=param_shardings,
      opt_state=optim.opt_state_shardings(optimizer, abstract_state.opt_state,
                                          param_shardings, repl))
  frozen_shardings = None if frozen is None else jax.tree.map(lambda a: a.sharding, frozen)
  patch_grid = None
  if frozen is not None and "patch_teacher" in frozen:
    patch_grid = config.data.item_image_size // config.model.patch_size
  loss_fn = step_lib.make_loss_fn(model, teacher_model, config.stage, config.loss,
                                  patch_grid)
  batch_sharding = sharding.batch_sharding(mesh)
  augment = device_augment.augment_queries if config.data.device_augment else None
  update = jax.jit(step_lib.make_update_fn(loss_fn, optimizer, augment),
                   in_shardings=(state_shardings, frozen_shardings, batch_sharding),
                   out_shardings=(state_shardings, repl), donate_argnums=(0,))
  return Trainer(model=model,
                 abstract_state=sharding.with_shardings(abstract_state, state_shardings),
                 batch_sharding=batch_sharding,
                 init=jax.jit(init_state, out_shardings=state_shardings),
                 update=update)


# ------------------------------------------------------------------- the stage ---

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None) -> dict[str, Any] | None:
  """Trains `config.stage` in `workdir` (resuming if it holds a checkpoint), evaluates.

  Args:
    config: an experiment config (`config_lib.experiment_config`).
    workdir: the run folder (`tigerfg_jax.workdir` lists what it holds).
    stop_after: leave after this many steps in this call, with a checkpoint written;
      the next call resumes. None: run to the end.

  Raises:
    preemption.Preempted: on SIGTERM, after saving the checkpoint of the step it
      stopped at (every process the same step).

  Returns:
    `{split: metrics}` of the final retrieval evaluation (`config.evals.retrieval`;
    {} when it does not run at the end), or None when stopped early.
  """
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  batch_size = config.train.batch_size
  if batch_size % mesh.shape["data"] or batch_size % jax.process_count():
    raise ValueError(
        f"config.train.batch_size={batch_size} must be divisible by the 'data' mesh "
        f"axis ({mesh.shape['data']} devices) and the {jax.process_count()} processes")
  workdir_lib.check_workdir(workdir, config)
  changes = workdir_lib.resume_changes(config, workdir)

  # --- data and tokenizer ---
  data_root, splits = prepare_data(config, workdir)
  teacher_dir = resolve_teacher(config, workdir, data_root) if needs_teacher(config) else None
  tokenizer = workdir_lib.run_tokenizer(config, workdir, tokenizer_texts(config, splits),
                                        teacher_dir)

  # --- model, optimizer, teacher ---
  teacher_model, teacher_params = None, None
  if teacher_dir is not None:
    teacher_model, teacher_params = workdir_lib.load_run(teacher_dir, mesh,
                                                         tokenizer.vocab_size)
  frozen = {} if teacher_params is None else {"teacher": teacher_params}
  if config.stage == "distill" and config.teacher.patch_teacher:
    frozen["patch_teacher"] = patch_teacher_lib.load_patch_teacher(
        config.teacher.patch_teacher, sharding.replicated(mesh))
  frozen = frozen or None
  trainer = make_trainer(config, mesh, tokenizer.vocab_size, teacher_model, frozen)

  # --- input pipeline and checkpoint restore ---
  train_iter = pipeline.train_iterator(
      splits["train"], tokenizer, config.data, batch_size=batch_size,
      patch_size=config.model.patch_size, max_title_len=config.model.max_title_len,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), target_crops=needs_target_crops(config),
      text_queries=step_lib.uses_text_queries(config.loss),
      max_query_len=config.model.max_query_len)
  manager = workdir_lib.checkpoint_manager(workdir, config.train.keep_checkpoints)
  if manager.latest_step() is not None:
    step0 = manager.latest_step()
    logging.info("Resuming from %s/%d%s", manager.directory, step0,
                 "".join(f"; config.{k}: {old!r} -> {new!r}"
                         for k, (old, new) in changes.items()))
    state, data_state = workdir_lib.restore_checkpoint(manager, step0,
                                                       trainer.abstract_state)
    train_iter.set_state(data_state)
  else:
    state = trainer.init(jax.random.PRNGKey(config.seed))
    if workdir_lib.has_init_params(workdir):
      state = state.replace(params=workdir_lib.restore_init_params(
          workdir, trainer.abstract_state.params))
    elif config.teacher.init_student:
      state = student_from_teacher(state, teacher_params, teacher_dir,
                                   shared_only=config.stage == "text_query")
  # Everything is checked: only now is the run folder written.
  workdir_lib.write_run_files(config, workdir, tokenizer, changes, int(state.step))

  # --- evaluators ---
  eval_splits = {name: split for name, split in splits.items() if name != "train"}
  scheduled = evaluators.from_config(config, trainer.model, tokenizer, eval_splits, mesh,
                                     workdir)

  # --- train loop ---
  total = config.train.steps
  first = int(state.step)
  last = total if stop_after is None else min(total, first + stop_after)
  writer = metric_writer.MetricWriter(workdir)
  timer = metric_writer.StepTimer(
      first, total, batch_size,
      flops.train_step_flops(
          config, None if teacher_dir is None else workdir_lib.load_config(teacher_dir),
          patch_teacher=bool(config.teacher.patch_teacher)))
  final_results: dict[str, Any] = {}
  prefetcher = prefetch.DevicePrefetcher(
      train_iter, lambda host: sharding.global_batch(host, trainer.batch_sharding))
  waited = 0.0
  with preemption.PreemptionWatch() as watch, prefetcher, contextlib.closing(train_iter):
    for step in range(first + 1, last + 1):
      batch, data_state = prefetcher.next()
      state, measurements = trainer.update(state, frozen, batch)
      preempted = watch.requested(step)
      is_log = step % config.train.log_every == 0 or step == last
      is_ckpt = step % config.train.checkpoint_every == 0 or step == last or preempted
      if is_log or is_ckpt:
        scalars = {k: float(v) for k, v in jax.device_get(measurements).items()}
        if not np.isfinite(scalars["loss"]):
          manager.wait_until_finished()
          raise NonFiniteLossError(
              f"loss is {scalars['loss']} at step {step} ({scalars}); stopping. The last "
              f"good checkpoint is step {manager.latest_step()} in {manager.directory}")
        scalars.update(timer.tick(step))
        scalars["data_wait_s"], waited = prefetcher.data_wait_s - waited, prefetcher.data_wait_s
        if is_log:
          writer.write(step, scalars)
          metric_writer.log_progress(step, total, scalars)
      if is_ckpt:
        workdir_lib.save_checkpoint(manager, step, state, data_state)
      if preempted:
        manager.wait_until_finished()
        writer.close()
        raise preemption.Preempted(step, manager.directory)
      final_results.update(run_evaluators(scheduled, step, total, state.params, writer))
  if first == total:  # a finished run rerun: evaluate its last checkpoint again.
    final_results.update(run_evaluators(scheduled, total, total, state.params, writer))
  manager.wait_until_finished()
  writer.close()
  if last < total:
    return None
  return final_results.get("retrieval", {})


def run_evaluators(scheduled: list[evaluators.Scheduled], step: int, total: int,
                   params: Any, writer: metric_writer.MetricWriter) -> dict[str, Any]:
  """Runs the evaluators due after `step`, logs their scalars; returns final results."""
  final_results = {}
  for evaluator in scheduled:
    due, final = evaluator.due(step, total)
    if due:
      results = evaluator.evaluator.run(params, final=final)
      writer.write(step, {f"{evaluator.name}/{k}": v
                          for k, v in evaluator.evaluator.scalars(results).items()})
      if final:
        final_results[evaluator.name] = results
  return final_results
