"""Fixtures shared by test modules: one trained micro run for every reader of a run."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Tests run on the CPU. With libtpu installed (requirements-test.txt, for the
# ahead-of-time TPU compile), JAX would otherwise probe for a TPU in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests, and the training processes they start, compile the same micro programs:
# one persistent compilation cache per session (empty at the start, removed at exit)
# lets later compiles load them. Environment variables, so the subprocesses share it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _compile_cache = tempfile.mkdtemp(prefix="tigerfg_jax_test_compile_cache_")
  atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _compile_cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

from tests import train_helpers
from tigerfg_jax.data import synthetic


@pytest.fixture(scope="session")
def micro_catalog(tmp_path_factory) -> str:
  """A 24-item synthetic catalog at 32 px, shared by the tests that train on it."""
  root = str(tmp_path_factory.mktemp("micro_catalog_24"))
  synthetic.write_catalog(root, seed=0, items=24, image_size=32)
  return root


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> tuple[str, str]:
  """(workdir, catalog root) of a 2-step micro distill run without a teacher.

  Shared: tests that change the run work on a copy (`shutil.copytree`).
  """
  root = str(tmp_path_factory.mktemp("micro_catalog"))
  workdir = str(tmp_path_factory.mktemp("micro_run"))
  train_helpers.train_micro_run(root, workdir)
  return workdir, root
