"""Stopping at a step boundary when the job is preempted (SIGTERM).

Spot VMs, TPU pods and SLURM give notice with SIGTERM. One process: a handler sets a
flag that the train loop reads after each step. Several processes: JAX's own
preemption service (started by `jax.distributed.initialize`, also on SIGTERM) picks the
step every process stops at (`multihost_utils.reached_preemption_sync_point`), so all
save the same checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import jax
from jax.experimental import multihost_utils

# Exit status of a command stopped by preemption (sysexits EX_TEMPFAIL: run it again).
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """Training stopped on SIGTERM after saving the checkpoint of `step`."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"preempted: saved the checkpoint of step {step} in {directory}; "
                     "run the same command again to resume")
    self.step = step


class PreemptionWatch:
  """Context manager: `requested(step)` is True once every process should stop."""

  def __init__(self):
    self._flag = threading.Event()
    self._previous = None

  def __enter__(self) -> "PreemptionWatch":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum: int, frame: FrameType | None) -> None:
    del signum, frame
    self._flag.set()

  def requested(self, step: int) -> bool:
    """Call after every step (all processes, same steps)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._flag.is_set()
