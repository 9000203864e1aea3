"""The analytic FLOP count of `training.flops` against XLA's view of the real step.

Two independent references, both from the jitted update step of each stage (CPU, one
device): (1) the matmul FLOPs of its HLO, summed here from every `dot` and
`convolution` instruction's shapes; the analytic count must agree within 0.5%.
(2) XLA's `cost_analysis()["flops"]`, which also counts elementwise work (norms,
activations, softmax, losses, AdamW): it must lie above the matmul count, by less at
the tiny preset's widths (96) than at micro's (32), where elementwise work per matmul
FLOP is about 3x larger.
"""

import functools
import math
import re

import pytest

from tigerfg_jax import aot_check
from tigerfg_jax import config_lib
from tigerfg_jax import sharding
from tigerfg_jax.training import flops

STAGES = ("teacher", "distill", "clip_style")
# Upper bound on (XLA FLOPs / analytic matmul FLOPs) - 1, the elementwise share. Measured
# 0.16-0.18 (micro) and 0.05-0.07 (tiny).
ELEMENTWISE_SHARE = {"micro": 0.25, "tiny": 0.08}

_SHAPE = r"[a-z0-9]+\[([0-9,]*)\]"


def _dims(text):
  return [int(x) for x in text.split(",") if x]


def hlo_matmul_flops(hlo: str) -> int:
  """2 * multiply-adds of every dot and convolution in an HLO module's text."""
  shapes = {name: _dims(dims) for name, dims in re.findall(r"(%?[\w.-]+) = " + _SHAPE, hlo)}
  total = 0
  for line in hlo.splitlines():
    match = re.search(r"= " + _SHAPE + r"\S*\s+(dot|convolution)\((%?[\w.-]+)", line)
    if not match:
      continue
    out, op, lhs = _dims(match.group(1)), match.group(2), shapes[match.group(3)]
    if op == "dot":
      contracting = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", line)
      reduced = math.prod(lhs[i] for i in _dims(contracting.group(1)))
    else:  # each output element sums over the window and the input features.
      window = re.search(r"window=\{size=([0-9x]+)", line)
      labels = re.search(r"dim_labels=([0-9a-z]+)_", line).group(1)
      reduced = math.prod(int(s) for s in window.group(1).split("x")) * lhs[labels.index("f")]
    total += 2 * math.prod(out) * reduced
  return total


def lower_and_count(config):
  """(lowered update step, analytic FLOPs) of an experiment config on the CPU mesh."""
  stage_config, teacher_config = aot_check.stage_configs(config)[-1]
  lowered = aot_check.lower_stage(stage_config, sharding.make_mesh(config.mesh),
                                  teacher_config)
  return lowered, flops.train_step_flops(stage_config, teacher_config)


@functools.lru_cache(maxsize=None)
def lowered_step(preset: str, stage: str):
  """`lower_and_count` of `stage` at `preset`, its default config."""
  return lower_and_count(config_lib.experiment_config(stage, preset))


@pytest.mark.parametrize("preset", ["micro", "tiny"])
@pytest.mark.parametrize("stage", STAGES)
def test_analytic_count_matches_the_steps_matmuls(preset, stage):
  lowered, analytic = lowered_step(preset, stage)
  assert hlo_matmul_flops(lowered.as_text(dialect="hlo")) == pytest.approx(analytic, rel=5e-3)


@pytest.mark.parametrize("preset", ["micro", "tiny"])
@pytest.mark.parametrize("stage", STAGES)
def test_xla_flops_exceed_matmuls_by_the_elementwise_share(preset, stage):
  lowered, analytic = lowered_step(preset, stage)
  share = lowered.cost_analysis()["flops"] / analytic - 1
  assert 0 < share < ELEMENTWISE_SHARE[preset]


@pytest.mark.parametrize("stage", STAGES)
def test_elementwise_share_shrinks_with_width(stage):
  shares = {preset: lowered_step(preset, stage)[0].cost_analysis()["flops"]
            / lowered_step(preset, stage)[1] - 1 for preset in ("micro", "tiny")}
  assert shares["tiny"] < shares["micro"] / 2


def test_compiled_step_agrees():
  """After XLA's optimisations (fusion, DCE, dot simplification) the compiled step's
  matmuls and cost analysis still agree with the count."""
  lowered, analytic = lowered_step("micro", "distill")
  compiled = lowered.compile()
  assert hlo_matmul_flops(compiled.as_text()) == pytest.approx(analytic, rel=5e-3)
  cost = compiled.cost_analysis()
  assert 0 < cost["flops"] / analytic - 1 < ELEMENTWISE_SHARE["micro"]


def test_q2i_alone_is_three_passes_and_the_sdd_teacher_one_forward():
  """Without the other terms: three student passes (two for the patch embedding);
  L_SDD adds one teacher forward (on the crops) and its similarities."""
  config = config_lib.experiment_config("distill", "micro")
  config_lib.apply_overrides(config, {
      "loss.w_v2t": 0.0, "loss.w_i2v": 0.0, "loss.w_srd": 0.0, "loss.w_spatial_map": 0.0,
      "loss.w_sdd": 0.0, "loss.hard_negatives": 0, "model.zoom_threshold": 0.0})
  forward = flops.forward_flops(config)
  one_pass = sum(forward.values())
  alone = flops.train_step_flops(config, config)
  assert alone == 3 * one_pass - forward["patch_embed"]
  config.loss.w_sdd = 1.0
  # The student's logits once more for the KL (3x), the teacher's forward and logits.
  assert flops.train_step_flops(config, config) - alone == 3 * forward["logits"] + one_pass


def test_flops_scale_linearly_with_the_batch_but_logits_quadratically():
  config = config_lib.experiment_config("teacher", "micro")
  small = flops.forward_flops(config)
  config.train.batch_size *= 2
  large = flops.forward_flops(config)
  assert large["rest"] == 2 * small["rest"]
  assert large["patch_embed"] == 2 * small["patch_embed"]
  assert large["logits"] == 4 * small["logits"]


def test_patch_embedding_count_is_the_convolution():
  """One image: 2 * patches * (p * p * 3) * width, here by hand for the micro ViT
  (32 px, 8 px patches: 16 patches; width 32)."""
  config = config_lib.experiment_config("teacher", "micro")
  config.train.batch_size = 1
  assert flops.forward_flops(config)["patch_embed"] == 2 * (2 * 16 * 8 * 8 * 3 * 32)


def test_mfu_arithmetic():
  # 8 v5e chips at 197 TFLOP/s each, 1.576e15 FLOPs in 2 s: 788 TFLOP/s of 1576.
  assert flops.mfu(1.576e15, 2.0, "TPU v5 lite", 8) == pytest.approx(0.5)
  # One H100 doing 98.9 TFLOP in 1 s is at 10% of 989.
  assert flops.mfu(98.9e12, 1.0, "NVIDIA H100 80GB HBM3", 1) == pytest.approx(0.1)


def test_peak_picks_the_most_specific_device_kind():
  assert flops.peak_tflops("TPU v5 lite") == 197.0
  assert flops.peak_tflops("TPU v5") == 459.0
  assert flops.peak_tflops("TPU v6 lite") == 918.0
  assert flops.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0


def test_mfu_is_none_without_a_known_peak():
  assert flops.mfu(1e12, 1.0, "cpu", 1) is None
  assert flops.peak_tflops("cpu") is None


def test_mfu_rejects_a_non_positive_step_time():
  with pytest.raises(ValueError, match="step_seconds"):
    flops.mfu(1e12, 0.0, "TPU v4", 4)


@pytest.mark.parametrize("overrides", [{"loss.v2t_query": False}, {"loss.w_srd": 0.0},
                                       {"model.zoom_refinements": 0},
                                       {"model.zoom_threshold": 0.0}])
def test_a_terms_share_of_the_count_is_its_share_of_the_hlo(overrides):
  """Turning one term off removes from the analytic count exactly the matmul FLOPs it
  removes from the step's HLO (the whole-step tolerance of 0.5% would hide a term as
  small as the query-title logits)."""
  full, full_analytic = lowered_step("micro", "distill")
  lowered, analytic = lower_and_count(config_lib.apply_overrides(
      config_lib.experiment_config("distill", "micro"), overrides))
  removed_hlo = (hlo_matmul_flops(full.as_text(dialect="hlo"))
                 - hlo_matmul_flops(lowered.as_text(dialect="hlo")))
  removed_analytic = full_analytic - analytic
  assert removed_analytic > 0
  assert removed_analytic == pytest.approx(removed_hlo, rel=0.02)
