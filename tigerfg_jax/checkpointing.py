"""Orbax checkpoints of the train state plus the input pipeline's iterator state.

A checkpoint holds two items: `state` (step, params, optimizer state, PRNG key; saved
asynchronously, sharded as in memory) and `data` (the Grain iterator state as JSON), so
a restored run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint's arrays do not fit the model the config builds."""


def make_manager(directory: str, keep: int = 1) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "data": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         data_state: dict[str, Any]) -> None:
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=True)


def _path_name(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                  for k in path)


def check_shapes(stored: Any, abstract: Any, where: str) -> None:
  """Raises CheckpointMismatchError naming every array whose shape differs or is missing."""
  stored_shapes = {_path_name(p): tuple(m.shape)
                   for p, m in jax.tree_util.tree_leaves_with_path(stored)}
  wanted_shapes = {_path_name(p): tuple(a.shape)
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


def restore(manager: ocp.CheckpointManager, step: int,
            abstract_state: Any) -> tuple[Any, dict[str, Any]]:
  """Restores `(state, data_state)` at `step` into the shardings of `abstract_state`.

  `abstract_state` is a tree of `jax.ShapeDtypeStruct`s with `.sharding` set.
  """
  stored = manager.item_metadata(step)["state"].tree
  check_shapes(stored, abstract_state,
               f"{manager.directory}/{step}")
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def restore_params(directory: str, abstract_params: Any) -> Any:
  """The params of the latest checkpoint under `directory` (e.g. a frozen teacher).

  Reads only the `params` subtree: the optimizer state stays on disk.
  """
  manager = make_manager(directory) if os.path.isdir(directory) else None
  step = manager.latest_step() if manager else None
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {directory}")
  stored_params = manager.item_metadata(step)["state"].tree["params"]
  state_dir = os.path.join(os.path.abspath(directory), str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  check_shapes(stored_params, abstract_params, f"{directory}/{step} (params)")
  restored = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(
      item={"params": abstract_params},
      restore_args={"params": jax.tree.map(
          lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)},
      partial_restore=True))
  return restored["params"]
