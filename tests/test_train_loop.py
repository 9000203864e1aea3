"""The whole stage on the micro preset: outputs, resume, teacher-first distillation."""

import json
import os

import jax
import numpy as np
import pytest

from tests import train_helpers
from tigerfg_jax import sharding
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.training import metric_writer
from tigerfg_jax.training import step as step_lib
from tigerfg_jax.training import trainer


@pytest.fixture(name="catalog")
def catalog_fixture(micro_catalog):
  return micro_catalog


def _read_metrics(workdir, kind="train"):
  """metrics.jsonl rows: 'train' (with a loss) or 'eval' (an evaluator's scalars)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if ("loss" in r) == (kind == "train")]


def _final_params(workdir, config):
  """The params of the last checkpoint, restored through the trainer's layout."""
  tokenizer = workdir_lib.run_tokenizer(config, workdir, [], None)
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.make_trainer(config, mesh, tokenizer.vocab_size)
  manager = workdir_lib.checkpoint_manager(workdir)
  state, data_state = workdir_lib.restore_checkpoint(manager, manager.latest_step(),
                                            built.abstract_state)
  return state, data_state


def test_resume_equals_uninterrupted(tmp_path, catalog):
  config = train_helpers.micro_config(**{
      "train.steps": 12, "train.log_every": 1, "train.checkpoint_every": 4,
      **train_helpers.NO_TEACHER, **train_helpers.ONE_LOOK, "data.root": catalog})
  straight_dir, resumed_dir = str(tmp_path / "straight"), str(tmp_path / "resumed")
  straight = trainer.train_and_evaluate(config, straight_dir)
  assert trainer.train_and_evaluate(config, resumed_dir, stop_after=6) is None
  assert max(row["step"] for row in _read_metrics(resumed_dir)) == 6
  resumed = trainer.train_and_evaluate(config, resumed_dir)

  rows_straight = _read_metrics(straight_dir)
  rows_resumed = _read_metrics(resumed_dir)
  assert [r["step"] for r in rows_resumed] == list(range(1, 13))
  for a, b in zip(rows_straight, rows_resumed):
    for key in ("loss", "q2i", "v2t", "spatial_map", "temperature"):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f"step {a['step']} {key}")
  state_a, data_a = _final_params(straight_dir, config)
  state_b, data_b = _final_params(resumed_dir, config)
  assert data_a == data_b
  assert int(state_a.step) == int(state_b.step) == 12
  for a, b in zip(_leaves(state_a.params), _leaves(state_b.params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  assert straight == resumed
  eval_rows = _read_metrics(resumed_dir, "eval")
  assert [r["step"] for r in eval_rows] == [12]
  assert eval_rows == _read_metrics(straight_dir, "eval")
  assert eval_rows[0]["retrieval/eval_normal/R@1"] == resumed["eval_normal"]["R@1"]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_distill_trains_its_teacher_first_and_writes_the_contract_files(tmp_path, catalog):
  config = train_helpers.micro_config(**{"train.steps": 4, "train.log_every": 2,
                                         "data.root": catalog,
                                         "evals.retrieval.every": 2,
                                         "evals.box_oracle.at_end": True})
  workdir = str(tmp_path / "run")
  results = trainer.train_and_evaluate(config, workdir)
  teacher_dir = os.path.join(workdir, "teacher")
  assert os.path.isdir(os.path.join(teacher_dir, "checkpoints"))
  assert json.load(open(os.path.join(teacher_dir, "config.json")))["stage"] == "teacher"
  rows = _read_metrics(workdir)
  assert [r["step"] for r in rows] == [2, 4]
  for row in rows:
    for key in ("loss", *step_lib.IMAGE_TERMS, "temperature"):
      assert np.isfinite(row[key]), key
    assert row["data_wait_s"] >= 0
  # Rates need one measured interval; on the CPU there is no bf16 peak, so no MFU.
  assert rows[-1]["tflops_per_s_per_device"] > 0 and "mfu" not in rows[-1]
  on_disk = json.load(open(os.path.join(workdir, "eval", "results.json")))
  assert set(on_disk) == {"eval_normal", "eval_cluttered"} == set(results)
  for split in on_disk.values():
    assert {"R@1", "R@5", "R@10", "mAP@10", "num_queries", "num_items"} <= set(split)
    assert 0 <= split["R@1"] <= split["R@5"] <= split["R@10"] <= 100
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  # The evaluators: retrieval every 2 steps and at the end, the box oracle at the end.
  eval_rows = _read_metrics(workdir, "eval")
  retrieval_steps = [r["step"] for r in eval_rows if "retrieval/eval_normal/R@1" in r]
  assert retrieval_steps == [2, 4]
  assert eval_rows[-1]["retrieval/eval_cluttered/R@1"] == results["eval_cluttered"]["R@1"]
  oracle = json.load(open(os.path.join(workdir, "eval", "box_oracle.json")))
  assert set(oracle) == {"eval_normal", "eval_cluttered"}
  box_r1 = oracle["eval_cluttered"]["box"]["R@1"]
  assert any(r.get("box_oracle/eval_cluttered/box/R@1") == box_r1
             for r in eval_rows if r["step"] == 4)


def test_student_starts_from_a_copy_of_the_teacher():
  config = train_helpers.micro_config(**train_helpers.NO_TEACHER, **train_helpers.ONE_LOOK)
  mesh = sharding.make_mesh(config.mesh)
  built = trainer.make_trainer(config, mesh, train_helpers.VOCAB_SIZE)
  student = built.init(jax.random.PRNGKey(0))
  teacher_params = built.init(jax.random.PRNGKey(1)).params
  started = trainer.student_from_teacher(student, teacher_params, "teacher_dir")
  for got, want in zip(_leaves(started.params), _leaves(teacher_params)):
    np.testing.assert_array_equal(got, want)
  assert any(np.any(a != b) for a, b in zip(_leaves(teacher_params), _leaves(student.params)))
  # A copy: stepping the student (which donates its buffers) leaves the teacher usable.
  batch = train_helpers.random_batch(config, 4, seed=0)
  stepped, _ = built.update(started, None, batch)
  assert any(np.any(a != b) for a, b in zip(_leaves(stepped.params), _leaves(teacher_params)))

  other = train_helpers.micro_config(**{"model.embed_dim": 64})
  other_params = trainer.make_trainer(other, mesh, train_helpers.VOCAB_SIZE).init(
      jax.random.PRNGKey(1)).params
  with pytest.raises(ValueError, match=r"teacher_dir has another parameter layout(.|\n)*"
                                       r"\['projection'\]\['kernel'\]: "
                                       r"student \(32, 256\), teacher \(32, 64\)"):
    trainer.student_from_teacher(student, other_params, "teacher_dir")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, catalog):
  # A step of 1e38 overflows the params: the next loss is not finite.
  config = train_helpers.micro_config(**{
      "train.steps": 6, "train.log_every": 1, "train.checkpoint_every": 1,
      "train.warmup_steps": 1, "train.learning_rate": 1e38, **train_helpers.NO_TEACHER,
      **train_helpers.ONE_LOOK, "data.root": catalog})
  workdir = str(tmp_path / "run")
  with pytest.raises(trainer.NonFiniteLossError, match="last good checkpoint is step 1"):
    trainer.train_and_evaluate(config, workdir)
  assert [row["step"] for row in _read_metrics(workdir)] == [1]
  assert workdir_lib.checkpoint_manager(workdir).latest_step() == 1


def test_a_config_saved_before_new_keys_loads_as_it_ran(tmp_path):
  config = train_helpers.micro_config(**{"data.item_image_size": 48,
                                         "data.query_image_size": 48})
  workdir_lib.save_config(config, str(tmp_path))
  assert workdir_lib.load_config(str(tmp_path)).to_dict() == config.to_dict()
  saved = json.loads((tmp_path / "config.json").read_text())
  for section, key in (("model", "posemb_grid"), ("data", "synthetic_eval_items"),
                       ("data", "synthetic_clutter_grid"), ("teacher", "init_student")):
    del saved[section][key]
  # The objective's keys before the paper's whole objective: three terms, other names.
  for key in ("w_v2t", "v2t_query", "w_i2v", "w_srd", "hard_negatives"):
    del saved["loss"][key]
  saved["loss"]["w_infonce"] = saved["loss"].pop("w_q2i")
  saved["loss"]["w_sim"] = saved["loss"].pop("w_sdd")
  saved["loss"]["w_spatial"] = saved["loss"].pop("w_spatial_map")
  (tmp_path / "config.json").write_text(json.dumps(saved))
  old = workdir_lib.load_config(str(tmp_path))
  assert (old.loss.w_q2i, old.loss.w_sdd, old.loss.w_spatial_map) == (
      config.loss.w_q2i, config.loss.w_sdd, config.loss.w_spatial_map)
  assert (old.loss.w_v2t, old.loss.w_i2v, old.loss.w_srd, old.loss.hard_negatives) == (
      0, 0, 0, 0)
  assert config.loss.v2t_query and old.loss.v2t_query is False
  # What such a run did: a 6 x 6 position table (48 px / 8 px patches), a quarter of
  # train per eval split, 3 x 3 clutter, a student trained from scratch.
  assert old.model.posemb_grid == 6
  assert old.data.synthetic_eval_items == 0 and old.data.synthetic_clutter_grid == 3
  assert old.teacher.init_student is False


def test_the_console_line_is_short_and_the_eta_reads_as_a_clock():
  assert metric_writer.format_duration(3725.4) == "1:02:05"
  assert metric_writer.format_duration(59.6) == "0:01:00"
  assert metric_writer.format_duration(90061) == "25:01:01"
  line = metric_writer.progress_line(120, 300, {"loss": 1.51937, "q2i": 1.2,
                                                "examples_per_s": 18.24, "eta_s": 317})
  assert line == "step 120/300  loss 1.519  18.2 examples/s  ETA 0:05:17"
  assert metric_writer.progress_line(1, 300, {"loss": 2.0}) == "step 1/300  loss 2"


def test_the_timer_reports_mfu_against_the_device_peak(monkeypatch):
  timer = metric_writer.StepTimer(0, 100, 64, flops_per_step=int(3e14))
  monkeypatch.setattr(timer, "_kind", "NVIDIA H100 80GB HBM3")
  monkeypatch.setattr(timer, "_devices", 2)
  clock = iter([10.0, 12.5])
  monkeypatch.setattr(metric_writer.time, "perf_counter", lambda: next(clock))
  assert timer.tick(1) == {}
  rates = timer.tick(6)  # 5 steps in 2.5 s: 2 steps/s over 2 devices.
  assert rates["examples_per_s"] == pytest.approx(128)
  assert rates["tflops_per_s_per_device"] == pytest.approx(3e14 * 2 / 2 / 1e12)
  assert rates["mfu"] == pytest.approx(300 / 989)
  assert rates["eta_s"] == pytest.approx(47)
