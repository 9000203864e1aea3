"""The objective's configuration: equal compute, every term in distill, weight decay
on weight matrices only, a reused teacher must match, and bad values refused."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import train_helpers
from tigerfg_jax import config_lib
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.training import optim
from tigerfg_jax.training import step as step_lib
from tigerfg_jax.training import trainer


@pytest.mark.parametrize("preset", sorted(config_lib.PRESETS))
def test_the_baseline_trains_as_many_steps_as_teacher_and_student(preset):
  distill = config_lib.experiment_config("distill", preset)
  teacher = trainer.teacher_stage_config(distill, "data")
  baseline = config_lib.experiment_config("clip_style", preset)
  assert baseline.train.steps == teacher.train.steps + distill.train.steps


def test_distill_turns_every_term_on_and_the_baseline_only_q2i():
  distill = config_lib.experiment_config("distill", "tiny")
  assert step_lib.active_terms(distill.loss) == step_lib.IMAGE_TERMS
  text_stage = config_lib.experiment_config("text_query", "tiny")
  assert step_lib.active_terms(text_stage.loss) == step_lib.TEXT_QUERY_TERMS
  assert distill.loss.hard_negatives > 0
  baseline = config_lib.experiment_config("clip_style", "tiny")
  assert step_lib.active_terms(baseline.loss) == ("q2i",)


def test_weight_decay_reaches_weight_matrices_only():
  """One AdamW step with zero gradients moves only what is decayed: p -> p (1 - lr wd)."""
  config = train_helpers.micro_config(**{"train.warmup_steps": 1})
  params = {
      "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
      "attn": {"query": {"kernel": jnp.ones((4, 2, 2)), "bias": jnp.ones((2, 2))}},
      "vision": {"pos_embedding": jnp.ones((4, 4)), "cls": jnp.ones((1, 4))},
      "pooling": {"slots": jnp.ones((2, 4))},
      "text": {"embedding": jnp.ones((10, 4))},
      "norm": {"scale": jnp.ones((4,))},
      "log_temperature": jnp.ones(()),
  }
  optimizer = optim.make_optimizer(config.train)
  updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params),
                                optimizer.init(params), params)
  moved = optax.apply_updates(params, updates)
  lr = float(optim.learning_rate_schedule(config.train)(0))
  decayed = 1 - lr * config.train.weight_decay
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(moved)[0]}
  for name, value in flat.items():
    want = decayed if name.endswith("['kernel']") else 1.0
    np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=name)


def test_a_finished_teacher_of_another_config_is_not_reused(tmp_path):
  distill = train_helpers.micro_config(**{"data.root": str(tmp_path)})
  wanted = trainer.teacher_stage_config(distill, str(tmp_path))
  teacher_dir = str(tmp_path / "teacher")
  (tmp_path / "teacher").mkdir()
  workdir_lib.save_config(wanted, teacher_dir)
  trainer.check_teacher_matches(wanted, teacher_dir)  # the same config: reused.
  other = trainer.teacher_stage_config(distill, str(tmp_path))
  other.model.pooling_mlp_dim = 96
  with pytest.raises(workdir_lib.ResumeRefusedError,
                     match=r"config.model.pooling_mlp_dim: 64 \(teacher\) vs 96"):
    trainer.check_teacher_matches(other, teacher_dir)


def test_a_larger_teacher_cannot_initialise_the_student():
  config = train_helpers.micro_config(**{"teacher.vision_variant": "pico"})
  with pytest.raises(ValueError, match="teacher.init_student=false"):
    config_lib.validate(config)
  config.teacher.init_student = False
  config_lib.validate(config)
  assert trainer.teacher_stage_config(config, "data").model.vision_variant == "pico"


def test_the_teacher_stage_takes_its_spatial_map_from_the_box():
  config = train_helpers.micro_config("teacher", **{"loss.spatial_target": "teacher"})
  with pytest.raises(ValueError, match="spatial_target='teacher': the teacher stage has no"):
    config_lib.validate(config)
  config.loss.spatial_target = "box"
  config_lib.validate(config)


@pytest.mark.parametrize("key,value,message", [
    ("loss.hard_negatives", 8, "0 <= K < train.batch_size=8"),
    ("loss.w_srd", -1.0, "weights must be >= 0"),
    ("loss.srd_temperature", 0.0, "expected > 0"),
    ("data.mosaic_max_products", 1, "expected >= 2"),
])
def test_bad_objective_values_are_named(key, value, message):
  config = train_helpers.micro_config(**{key: value})
  with pytest.raises(ValueError, match=f"config.{key}.*{message}"):
    config_lib.validate(config)
