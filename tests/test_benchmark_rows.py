"""benchmarks/train_step.py: `--rows` picks rows by key, in table order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks import train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_select_rows_keeps_table_order_and_names_unknown_keys():
  assert train_step.select_rows(None) == list(train_step.ROWS)
  assert train_step.select_rows(["remat_dots", "float32"]) == ["float32", "remat_dots"]
  with pytest.raises(ValueError, match=r"unknown \['fp8'\].*float32, bfloat16"):
    train_step.select_rows(["float32", "fp8"])
  with pytest.raises(ValueError, match="--rows is empty"):
    train_step.select_rows([])


def test_benchmark_runs_only_the_chosen_row_against_itself():
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.train_step", "--config=configs/clip_style.py:micro",
       "--rows=bfloat16", "--steps=1", "--warmup=0"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
  rows = [line for line in result.stdout.splitlines()
          if line.startswith("| ") and not line.startswith("| row")]
  assert len(rows) == 1 and rows[0].startswith("| bfloat16 |")
  assert rows[0].rstrip().endswith("| 1.00x |")
  assert "| speed vs bfloat16 |" in result.stdout
