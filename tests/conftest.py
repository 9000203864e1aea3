"""Fixtures shared by test modules: one trained micro run for every reader of a run."""

from __future__ import annotations

import pytest

from tests import train_helpers


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory) -> tuple[str, str]:
  """(workdir, catalog root) of a 2-step micro distill run without a teacher.

  Shared: tests that change the run work on a copy (`shutil.copytree`).
  """
  root = str(tmp_path_factory.mktemp("micro_catalog"))
  workdir = str(tmp_path_factory.mktemp("micro_run"))
  train_helpers.train_micro_run(root, workdir)
  return workdir, root
