"""Where measurements go: `metrics.jsonl`, TensorBoard event files and the console.

Only process 0 writes. A gs:// workdir gets the same files through
`tigerfg_jax.runpath` (metrics.jsonl rewritten whole at each write, event files at each
flush). `StepTimer` reports examples/s and an ETA, ignoring the first measured interval
so that compilation does not count.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import jax
from absl import logging
from etils import epath
from tensorboardX import SummaryWriter
from tensorboardX import record_writer

from tigerfg_jax import runpath
from tigerfg_jax.training import flops


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if self._enabled:
      runpath.path(workdir).mkdir(parents=True, exist_ok=True)
      self._jsonl = runpath.path(workdir, "metrics.jsonl")
      self._tb = SummaryWriter(str(runpath.path(workdir, "tensorboard")))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self._enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    runpath.append_lines(self._jsonl, [json.dumps(row) + "\n"])
    for name, value in row.items():
      if name != "step":  # TensorBoard tags allow [\w./-] only ('R@1' -> 'R_1').
        self._tb.add_scalar(re.sub(r"[^\w./-]", "_", name), value, global_step=step)
    self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()


class _WholeFileWriter:
  """A TensorBoard event file on a URL: buffered, the whole file written at each flush."""

  def __init__(self, file: str):
    self._file = epath.Path(file)
    self._buffer = bytearray()

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self) -> None:
    self._file.write_bytes(bytes(self._buffer))

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  """tensorboardX's hook for a URL prefix: event files written through epath (in place
  of tensorboardX's own gs:// writer, which needs google-cloud-storage)."""

  def open(self, file: str) -> _WholeFileWriter:
    return _WholeFileWriter(file)

  def directory_check(self, folder: str) -> None:
    epath.Path(folder).mkdir(parents=True, exist_ok=True)


for _scheme in runpath.URL_SCHEMES:
  record_writer.register_writer_factory(_scheme, _EpathWriterFactory())


class StepTimer:
  """Throughput and ETA from wall time between `tick`s, the first interval excluded.

  With `flops_per_step` (`training.flops.train_step_flops`) also TFLOP/s per device
  and, where the device's bf16 peak is known (not on CPU), MFU.
  """

  def __init__(self, first_step: int, total_steps: int, global_batch: int,
               flops_per_step: int = 0):
    self._total = total_steps
    self._batch = global_batch
    self._flops = flops_per_step
    self._devices = jax.device_count()
    self._kind = jax.devices()[0].device_kind
    self._start_step = first_step
    self._start_time: float | None = None

  def tick(self, step: int) -> dict[str, float]:
    """Call after `step` has finished; returns {} until a rate can be measured."""
    now = time.perf_counter()
    if self._start_time is None:
      self._start_time, self._start_step = now, step
      return {}
    elapsed = now - self._start_time
    steps_done = step - self._start_step
    if steps_done <= 0 or elapsed <= 0:
      return {}
    steps_per_s = steps_done / elapsed
    rates = {"examples_per_s": steps_per_s * self._batch,
             "examples_per_s_per_device": steps_per_s * self._batch / self._devices,
             "eta_s": (self._total - step) / steps_per_s}
    if self._flops:
      rates["tflops_per_s_per_device"] = self._flops * steps_per_s / self._devices / 1e12
      utilisation = flops.mfu(self._flops, 1 / steps_per_s, self._kind, self._devices)
      if utilisation is not None:
        rates["mfu"] = utilisation
    return rates


def format_duration(seconds: float) -> str:
  """'h:mm:ss' (hours unbounded), e.g. 3725.4 -> '1:02:05'."""
  whole = int(round(seconds))
  return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def progress_line(step: int, total: int, scalars: dict[str, Any]) -> str:
  """'step 120/300  loss 1.519  18.2 examples/s  ETA 0:05:17' (the console's line;
  every scalar goes to metrics.jsonl and TensorBoard)."""
  parts = [f"step {step}/{total}", f"loss {scalars['loss']:.4g}"]
  if "examples_per_s" in scalars:
    parts.append(f"{scalars['examples_per_s']:.1f} examples/s")
  if "eta_s" in scalars:
    parts.append(f"ETA {format_duration(scalars['eta_s'])}")
  return "  ".join(parts)


def log_progress(step: int, total: int, scalars: dict[str, Any]) -> None:
  logging.info("%s", progress_line(step, total, scalars))
