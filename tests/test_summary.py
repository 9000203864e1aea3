"""Parameter counts from shapes only, and the summary CLI's contract."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import jax

from tigerfg_jax import config_lib
from tigerfg_jax.models import summary


def _vit_params(width: int, depth: int, mlp: int, patch: int, grid: int,
                registers: int) -> int:
  """Closed-form parameter count of this project's ViT."""
  attention = 4 * width * width + 3 * width  # q, v, out biases; no key bias
  mlp_block = width * mlp + mlp + mlp * width + width
  norms = 2 * 2 * width
  block = attention + mlp_block + norms
  embed = patch * patch * 3 * width + width + grid * grid * width
  return embed + (1 + registers) * width + depth * block + 2 * width


def test_b16_query_tower_is_85_7m():
  config = config_lib.experiment_config("distill", "b16")
  params = summary.abstract_params(config)
  leaves = jax.tree_util.tree_leaves(params)
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
  counts = summary.parameter_counts(params)
  want = _vit_params(768, 12, 3072, 16, 224 // 16, 4) + 768 * 256 + 256
  assert counts["query_tower"] == want
  assert abs(counts["query_tower"] - 85.7e6) <= 0.01 * 85.7e6, counts["query_tower"]


def test_counts_add_up_with_and_without_shared_vision():
  config = config_lib.experiment_config("distill", "micro")
  counts = summary.parameter_counts(summary.abstract_params(config))
  assert counts["item_vision"] == 0
  assert counts["vision"] == _vit_params(32, 2, 64, 8, 4, 0)
  assert counts["total"] == counts["item_tower"] + counts["query_head"] + 1
  config.model.share_vision = False
  config.model.query_pool = "map"
  unshared = summary.parameter_counts(summary.abstract_params(config))
  assert unshared["item_vision"] == unshared["vision"] == counts["vision"]
  assert unshared["query_head"] > counts["query_head"]
  assert unshared["total"] == unshared["query_tower"] + unshared["item_tower"] + 1


def test_cli_last_line():
  result = subprocess.run(
      [sys.executable, "-m", "tigerfg_jax.models.summary",
       "--config=configs/clip_style.py:micro"],
      capture_output=True, text=True, check=True, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  last = result.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"query_tower_params=(\d+)", last)
  assert match, result.stdout
  config = config_lib.experiment_config("clip_style", "micro")
  config.model.mode = "clip_style"
  counts = summary.parameter_counts(summary.abstract_params(config))
  assert int(match.group(1)) == counts["query_tower"]
  assert "global MAP pooling" in result.stdout
