"""Device prefetch: host batches moved to the devices in a background thread.

The thread takes a batch from the train iterator, records the iterator's state right
after it (the state to checkpoint once that batch has been consumed: the thread runs
ahead, so the iterator's current state is later than the consumer's), puts the batch on
the devices with the given function (e.g. `sharding.global_batch(batch, batch_sharding)`)
and queues it. At most `buffer_size` batches are taken from the iterator and not yet
returned by `next()`.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable, Iterator

_POLL_S = 0.05


class _End:
  """Queued after the last batch, or with the exception the thread raised."""

  def __init__(self, error: BaseException | None):
    self.error = error


class DevicePrefetcher:
  """`next() -> (device_batch, data_state)` from a thread that runs ahead.

  `iterator`: has `__next__` and `get_state()` (e.g. `pipeline.TrainIterator`); the
  thread alone uses it until `close()`. `put(host_batch) -> device_batch`.
  `data_wait_s`: total seconds `next()` has waited for the thread (a step's share of
  input time is the difference across the step). An exception raised by the iterator or
  by `put` is raised again by `next()` (and every later call); the end of the iterator
  raises StopIteration. `close()` stops and joins the thread (not the iterator: the
  caller closes what it made).
  """

  def __init__(self, iterator: Iterator[Any], put: Callable[[Any], Any],
               buffer_size: int = 2):
    if buffer_size < 1:
      raise ValueError(f"buffer_size={buffer_size}: expected >= 1")
    self._iterator, self._put = iterator, put
    self._queue: queue.Queue = queue.Queue()
    self._slots = threading.Semaphore(buffer_size)
    self._stop = threading.Event()
    self._end: _End | None = None
    self.data_wait_s = 0.0
    self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    try:
      while True:
        while not self._slots.acquire(timeout=_POLL_S):
          if self._stop.is_set():
            return
        if self._stop.is_set():
          return
        batch = next(self._iterator)
        state = self._iterator.get_state()
        self._queue.put((self._put(batch), state))
    except StopIteration:
      self._queue.put(_End(None))
    except BaseException as e:  # pylint: disable=broad-exception-caught
      self._queue.put(_End(e))

  def __iter__(self) -> DevicePrefetcher:
    return self

  def __next__(self) -> tuple[Any, Any]:
    if self._end is None:
      start = time.perf_counter()
      item = self._queue.get()
      self.data_wait_s += time.perf_counter() - start
      if not isinstance(item, _End):
        self._slots.release()
        return item
      self._end = item
    if self._end.error is not None:
      raise self._end.error
    raise StopIteration

  def next(self) -> tuple[Any, Any]:
    return self.__next__()

  def close(self) -> None:
    """Stops the thread and waits for it (it finishes the batch it is building)."""
    self._stop.set()
    self._thread.join()

  def __enter__(self) -> DevicePrefetcher:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
