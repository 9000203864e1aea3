"""Shared by the training tests: tiny configs and random batches in the batch contract."""

from __future__ import annotations

import numpy as np

from tigerfg_jax import config_lib

VOCAB_SIZE = 40

# A distill run without a teacher: no term reads one and the student starts fresh.
NO_TEACHER = {"loss.w_i2v": 0.0, "loss.w_sdd": 0.0, "loss.w_srd": 0.0,
              "teacher.init_student": False}

# One look at each item (no attention zoom), for tests whose subject is not the zoom:
# every look is another ViT pass to compile and run (tests/test_zoom.py tests the zoom).
ONE_LOOK = {"model.zoom_threshold": 0.0}

# Comparing params after Adam steps taken in different reduction orders (devices,
# processes): Adam divides by sqrt(v), so an element whose gradient is near zero turns
# 1e-7 relative noise into an update difference of a few % of a step (lr 1e-3; seen:
# 4% on one title-attention weight with the title-swap negatives). A real difference
# (other data, a missing reduction) moves most elements by whole steps.
ADAM_ATOL = 1e-4


def micro_config(stage: str = "distill", **overrides):
  """The `micro` preset with `overrides` given as {'train.steps': 3, ...}."""
  return config_lib.apply_overrides(config_lib.experiment_config(stage, "micro"), overrides)


def random_batch(config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
  """A batch with every key of docs/ARCHITECTURE.md, random but well-formed."""
  rng = np.random.default_rng(seed)
  item, query = config.data.item_image_size, config.data.query_image_size
  grid = item // config.model.patch_size
  length = config.model.max_title_len
  lengths = rng.integers(3, length + 1, batch_size)
  mask = np.arange(length)[None, :] < lengths[:, None]
  tokens = np.where(mask, rng.integers(4, VOCAB_SIZE, (batch_size, length)), 0)
  target = np.zeros((batch_size, grid, grid), np.float32)
  for b in range(batch_size):
    y0, x0 = rng.integers(0, grid - 1, 2)
    target[b, y0:y0 + 2, x0:x0 + 2] = 1
  target = target.reshape(batch_size, -1)
  target /= target.sum(-1, keepdims=True)
  return {
      "query_image": rng.integers(0, 256, (batch_size, query, query, 3), np.uint8),
      "item_image": rng.integers(0, 256, (batch_size, item, item, 3), np.uint8),
      "target_image": rng.integers(0, 256, (batch_size, item, item, 3), np.uint8),
      "title_tokens": tokens.astype(np.int32),
      "title_mask": mask,
      "box": rng.uniform(0, 1, (batch_size, 4)).astype(np.float32),
      "has_box": np.ones(batch_size, bool),
      "spatial_target": target,
      "group": np.arange(batch_size, dtype=np.int32) // 2,
  }


def train_micro_run(catalog_dir: str, workdir: str, *, catalog_seed: int = 0,
                    steps: int = 2) -> None:
  """A micro distill run without a teacher (no KL, no teacher init) on a fresh catalog."""
  from tigerfg_jax.data import synthetic
  from tigerfg_jax.training import trainer
  synthetic.write_catalog(catalog_dir, seed=catalog_seed, items=24, image_size=32)
  config = config_lib.apply_overrides(config_lib.experiment_config("distill", "micro"),
                                      NO_TEACHER)
  config.train.steps = steps
  config.data.root = catalog_dir
  trainer.train_and_evaluate(config, workdir)
