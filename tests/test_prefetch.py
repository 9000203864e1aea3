"""Tests of the device prefetch thread (tigerfg_jax/training/prefetch.py)."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

from tigerfg_jax import config_lib
from tigerfg_jax.data import pipeline, synthetic
from tigerfg_jax.data.tokenizer import TitleTokenizer
from tigerfg_jax.training import prefetch


class _Counting:
  """An endless source of ints with a state; optionally slow or failing at `fail_at`."""

  def __init__(self, delay_s: float = 0.0, fail_at: int | None = None):
    self.taken, self._delay_s, self._fail_at = 0, delay_s, fail_at

  def __next__(self):
    time.sleep(self._delay_s)
    if self.taken == self._fail_at:
      raise RuntimeError(f"bad record {self.taken}")
    self.taken += 1
    return np.full(2, self.taken - 1)

  def get_state(self):
    return {"taken": self.taken}


def _train_iterator(tmp_path):
  synthetic.write_split(str(tmp_path / "train"), seed=0, split_index=0, items=12,
                        image_size=32, cluttered_fraction=0.5, one_to_many=False,
                        title_pattern_prob=synthetic.TITLE_PATTERN_PROB)
  split = pipeline.load_split(str(tmp_path), "train", cache_dir=str(tmp_path / "cache"),
                              item_size=32, query_size=32)
  config = config_lib.experiment_config("teacher", "micro").data
  tokenizer = TitleTokenizer.train(split.titles, 64)
  return lambda: pipeline.train_iterator(split, tokenizer, config, batch_size=4,
                                         patch_size=8, max_title_len=8, seed=0)


def _assert_same(host, device):
  assert host.keys() == device.keys()
  for key in host:
    assert isinstance(device[key], jax.Array)
    np.testing.assert_array_equal(host[key], np.asarray(device[key]), err_msg=key)


def test_order_and_the_state_recorded_with_each_batch(tmp_path):
  make = _train_iterator(tmp_path)
  plain = make()
  expected = [next(plain) for _ in range(6)]
  with prefetch.DevicePrefetcher(make(), jax.device_put) as prefetcher:
    got = [prefetcher.next() for _ in range(5)]
  for k, (batch, state) in enumerate(got):
    _assert_same(expected[k], batch)
    # The state recorded with batch k resumes at batch k + 1, though the thread had
    # already taken later batches from its iterator.
    resumed = make()
    resumed.set_state(state)
    for j in range(k + 1, min(k + 3, 6)):
      _assert_same(next(resumed), jax.device_put(expected[j]))


def test_source_exception_is_raised_by_the_consumer():
  prefetcher = prefetch.DevicePrefetcher(_Counting(fail_at=2), lambda x: x)
  assert [int(prefetcher.next()[0][0]) for _ in range(2)] == [0, 1]
  for _ in range(2):
    with pytest.raises(RuntimeError, match="bad record 2"):
      prefetcher.next()
  prefetcher.close()


def test_end_of_source_stops_iteration():
  source = iter([np.zeros(1), np.ones(1)])
  wrapped = type("Finite", (), {"__next__": lambda self: next(source),
                                "get_state": lambda self: None})()
  with prefetch.DevicePrefetcher(wrapped, lambda x: x) as prefetcher:
    assert [float(b[0]) for b, _ in prefetcher] == [0.0, 1.0]


def test_two_batches_in_flight_and_close_joins_the_thread():
  source = _Counting()
  prefetcher = prefetch.DevicePrefetcher(source, lambda x: x, buffer_size=2)
  batch, state = prefetcher.next()
  assert int(batch[0]) == 0 and state == {"taken": 1}
  deadline = time.monotonic() + 10
  while source.taken < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)
  assert source.taken == 3  # one returned, two waiting: the thread blocks there.
  threads = [t for t in threading.enumerate() if t.name == "device-prefetch"]
  prefetcher.close()
  assert threads and not any(t.is_alive() for t in threads)


def test_data_wait_counts_the_consumer_waiting():
  with prefetch.DevicePrefetcher(_Counting(delay_s=0.1), lambda x: x) as prefetcher:
    for _ in range(3):
      prefetcher.next()
    # Each batch takes 0.1 s to make and the consumer does nothing in between.
    assert prefetcher.data_wait_s >= 0.25
