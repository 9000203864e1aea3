"""The ablation-table driver: row configs, a real micro run of every row, resume, report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tigerfg_jax import config_lib
from tigerfg_jax import workdir as workdir_lib
from tigerfg_jax.experiments import paper_table
from tigerfg_jax.training import step as step_lib
from tigerfg_jax.training import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_LABELS = [row.label for row in paper_table.ROWS if row.in_table]
COLUMNS = [f"{split} {metric}" for split in ("normal", "cluttered")
           for metric in ("R@1", "R@5", "R@10")]


def parse_table(markdown: str) -> dict[str, dict[str, str]]:
  """{row label: {column: cell}} of the first Markdown table."""
  lines = [line for line in markdown.splitlines() if line.startswith("|")]
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  assert set(lines[1].replace("|", "")) == {"-"}
  table = {}
  for line in lines[2:]:
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert len(cells) == len(header), line
    table[cells[0]] = dict(zip(header[1:], cells[1:]))
  return table


def parse_cell(cell: str) -> tuple[float, float | None]:
  mean, _, std = cell.partition(" ± ")
  return float(mean), (float(std) if std else None)


def _flat(config) -> dict:
  return dict(_items(config.to_dict(), ""))


def _items(tree: dict, prefix: str):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _items(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


# ------------------------------------------------------------ row configs ---

def test_each_row_adds_one_piece(tmp_path):
  """Every row's config validates and differs from the row above in its own keys."""
  data, teacher = tmp_path / "data", tmp_path / "teacher"
  (teacher / "checkpoints").mkdir(parents=True)
  data.mkdir()
  configs = {}
  for row in paper_table.ROWS:
    configs[row.key] = paper_table.row_config(
        row, preset="micro", seed=7, data_root=str(data),
        teacher_dir=str(teacher) if row.teacher else None, steps=3)
    config_lib.validate(configs[row.key])
    # Equal compute: a row without a teacher trains the teacher's and the student's steps.
    assert configs[row.key].seed == 7
    assert configs[row.key].train.steps == (6 if row.teacher is None and row.in_table else 3)
    assert configs[row.key].data.root == str(data)
    assert configs[row.key].preset == "micro"

  def changed(before: str, after: str) -> set[str]:
    a, b = _flat(configs[before]), _flat(configs[after])
    return {k for k in a if a[k] != b[k]}

  default_mosaic = config_lib.experiment_config("distill", "micro").data.mosaic_prob
  assert default_mosaic > 0
  base = configs["clip_style"]
  assert (base.stage, base.model.mode, base.data.mosaic_prob) == ("clip_style", "clip_style", 0)
  assert step_lib.active_terms(base.loss) == ("q2i",) and base.loss.hard_negatives == 0
  assert changed("clip_style", "text_guided") == {"stage", "model.mode",
                                                 "evals.box_oracle.at_end"}
  assert changed("text_guided", "mosaic") == {"data.mosaic_prob"}
  assert configs["mosaic"].data.mosaic_prob == default_mosaic
  assert changed("mosaic", "title_swap") == {"loss.hard_negatives"}
  # The teacher comes in: its weights start the student, its crops are L_i2v's targets.
  # ... and the steps are the student's only (and the keys that scale with them).
  steps_keys = {"train.steps", "train.warmup_steps", "train.log_every",
                "train.checkpoint_every"}
  assert "train.steps" in changed("title_swap", "v2t_i2v")
  assert changed("title_swap", "v2t_i2v") - steps_keys == {
      "loss.w_v2t", "loss.v2t_query", "loss.w_i2v", "teacher.checkpoint",
      "teacher.init_student"}
  assert changed("v2t_i2v", "sdd") == {"loss.w_sdd"}
  assert changed("sdd", "srd") == {"loss.w_srd"}
  assert changed("srd", "spatial_map") == {"loss.w_spatial_map"}
  assert configs["spatial_map"].loss.w_spatial_map == 0.5
  # Every row before the last looks at each item once; the last zooms.
  assert changed("spatial_map", "zoom") == {"model.zoom_threshold", "model.zoom_refinements",
                                            "loss.w_spatial_map"}
  assert {key for key in configs if configs[key].model.zoom_threshold} == {"zoom",
                                                                           "one_to_many"}
  for key in ("v2t_i2v", "sdd", "srd", "spatial_map", "zoom"):
    assert configs[key].teacher.init_student
  assert step_lib.active_terms(configs["spatial_map"].loss) == step_lib.IMAGE_TERMS
  # The full row is configs/distill.py as it stands, plus seed, steps, data, teacher and
  # the box oracle.
  distill = paper_table.load_config_file(os.path.join(REPO, "configs", "distill.py"), "micro")
  distill.seed, distill.evals.box_oracle.at_end = 7, True
  config_lib.set_steps(distill.train, 3)
  distill.data.root, distill.teacher.checkpoint = str(data), str(teacher)
  assert _flat(distill) == _flat(configs["zoom"])
  assert _flat(configs["one_to_many"]) == _flat(configs["zoom"])
  assert configs["teacher"].stage == "teacher"


def test_rows_to_run_adds_teachers_first():
  keys = [row.key for row in paper_table.rows_to_run(["one_to_many", "sdd"])]
  assert keys == ["teacher", "sdd", "teacher_one_to_many", "one_to_many"]
  with pytest.raises(ValueError, match="unknown row.*nope"):
    paper_table.rows_to_run(["clip_style", "nope"])


def test_override_of_a_missing_key_is_an_error():
  config = config_lib.experiment_config("distill", "micro")
  with pytest.raises(KeyError, match="loss.w_typo"):
    config_lib.apply_overrides(config, {"loss.w_typo": 1.0})


# ----------------------------------------------------------------- report ---

def _fake_report(seeds, rng):
  rows = []
  for key, label, catalog in (("clip_style", "clip_style", "default"),
                              ("spatial_map", "+ spatial map", "default"),
                              ("one_to_many", "one-to-many", "one_to_many")):
    runs = {str(s): {"results": {split: {m: float(rng.uniform(0, 100)) for m in
                                         ("R@1", "R@5", "R@10", "mAP@10")}
                                 for split in ("eval_normal", "eval_cluttered")},
                     "box_oracle": None if key == "clip_style" else {
                         "eval_cluttered": {"deployed": {"R@1": 1.0},
                                            "box": {"R@1": float(rng.uniform(0, 100))},
                                            "crop": {"R@1": float(rng.uniform(0, 100))}}}}
            for s in seeds}
    rows.append({"key": key, "label": label, "catalog": catalog, "in_table": True,
                 "runs": runs})
  rows.append({**rows[0], "key": "teacher", "label": "teacher", "in_table": False})
  return {"rows": rows, "seeds": list(seeds), "preset": "tiny", "steps": None,
          "command": "python -m x", "date": "today", "catalogs": {"default": {}},
          "hardware": {"cpu": "cpu", "cores": 2, "jax_version": "0", "jax_devices": "1 x cpu"},
          "wall_s": {"invocation": 1.0, "runs": 2.0, "num_runs": 8}}


def test_runs_from_before_the_crop_column_show_a_dash():
  report = _fake_report([0, 1], np.random.default_rng(1))
  for run in report["rows"][1]["runs"].values():
    del run["box_oracle"]["eval_cluttered"]["crop"]
  table = parse_table(paper_table.format_report(report, "results.json"))
  assert table["+ spatial map"]["cluttered R@1, true crop"] == "–"
  assert table["+ spatial map"]["cluttered R@1, true box"] != "–"
  assert table["one-to-many"]["cluttered R@1, true crop"] != "–"


def test_report_means_stds_and_deltas():
  report = _fake_report([0, 1, 2], np.random.default_rng(0))
  markdown = paper_table.format_report(report, "results.json")
  table = parse_table(markdown)
  assert list(table) == ["clip_style", "+ spatial map", "one-to-many"]
  for entry in report["rows"][:3]:
    assert table[entry["label"]]["n"] == "3"
    for split, name in (("eval_normal", "normal"), ("eval_cluttered", "cluttered")):
      for metric in ("R@1", "R@5", "R@10"):
        values = np.asarray([run["results"][split][metric] for run in entry["runs"].values()])
        mean, std = parse_cell(table[entry["label"]][f"{name} {metric}"])
        assert mean == pytest.approx(values.mean(), abs=0.006)
        assert std == pytest.approx(values.std(ddof=1), abs=0.006)
    for row, column in (("box", "true box"), ("crop", "true crop")):
      cell = table[entry["label"]][f"cluttered R@1, {column}"]
      if entry["key"] == "clip_style":
        assert cell == "–"
        continue
      oracle = np.asarray([run["box_oracle"]["eval_cluttered"][row]["R@1"]
                           for run in entry["runs"].values()])
      mean, std = parse_cell(cell)
      assert mean == pytest.approx(oracle.mean(), abs=0.006)
      assert std == pytest.approx(oracle.std(ddof=1), abs=0.006)
  r1 = {e["key"]: {s: np.mean([run["results"][s]["R@1"] for run in e["runs"].values()])
                   for s in ("eval_normal", "eval_cluttered")} for e in report["rows"][:2]}
  delta_lines = [line for line in markdown.splitlines() if line.startswith("- + spatial map:")]
  assert delta_lines == [
      f"- + spatial map: cluttered "
      f"{r1['spatial_map']['eval_cluttered'] - r1['clip_style']['eval_cluttered']:+.2f}, "
      f"normal {r1['spatial_map']['eval_normal'] - r1['clip_style']['eval_normal']:+.2f}"]
  assert not any(line.startswith("- one-to-many:") for line in markdown.splitlines())
  assert "`python -m x`" in markdown and "2 cores" in markdown


def test_report_with_one_seed_has_no_std():
  report = _fake_report([5], np.random.default_rng(1))
  table = parse_table(paper_table.format_report(report, "results.json"))
  cell = table["clip_style"]["normal R@1"]
  assert "±" not in cell
  value = report["rows"][0]["runs"]["5"]["results"]["eval_normal"]["R@1"]
  assert float(cell) == pytest.approx(value, abs=0.006)


# ------------------------------------------------------------ the driver ---

class FakeTrainer:
  """Stands in for trainer.train_and_evaluate: validates the config it is given, writes
  the files a finished run leaves (config.json, checkpoints/, eval/results.json) with
  random metrics, and records every call."""

  def __init__(self):
    self.calls = []
    self.rng = np.random.default_rng(0)

  def __call__(self, config, workdir):
    config_lib.validate(config)  # also checks data.root and the teacher's checkpoints/
    self.calls.append((workdir, config))
    os.makedirs(os.path.join(workdir, "checkpoints"))
    os.makedirs(os.path.join(workdir, "eval"))
    workdir_lib.save_config(config, workdir)
    results = {split: {"R@1": float(self.rng.uniform(0, 100)),
                       "R@5": float(self.rng.uniform(0, 100)),
                       "R@10": float(self.rng.uniform(0, 100)),
                       "mAP@10": float(self.rng.uniform(0, 100)),
                       "num_queries": 8, "num_items": 8}
               for split in ("eval_cluttered", "eval_normal")}
    with open(os.path.join(workdir, "eval", "results.json"), "w") as f:
      json.dump(results, f)
    return results


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_every_row_and_seed_then_resume(tmp_path, monkeypatch):
  workdir, out = str(tmp_path / "table"), str(tmp_path / "docs" / "results.md")
  args = dict(preset="micro", steps=2, items=8, image_size=32, out=out)
  fake = FakeTrainer()
  monkeypatch.setattr(trainer, "train_and_evaluate", fake)
  report = paper_table.run_table(workdir, seeds=[0, 1], **args)

  # Each row x seed once, teachers before their students, each in its own workdir.
  dirs = [workdir_ for workdir_, _ in fake.calls]
  assert len(dirs) == len(set(dirs)) == 2 * len(paper_table.ROWS)
  per_seed_runs = len(paper_table.ROWS)
  for seed in (0, 1):
    chunk = dirs[seed * per_seed_runs:(seed + 1) * per_seed_runs]
    assert [os.path.relpath(d, workdir) for d in chunk] == [
        f"{row.key}/seed_{seed}" for row in paper_table.ROWS]
  configs = {os.path.relpath(d, workdir): c for d, c in fake.calls}
  for seed in (0, 1):
    for row in paper_table.ROWS:
      config = configs[f"{row.key}/seed_{seed}"]
      assert config.seed == seed
      assert config.train.steps == (4 if row.equal_compute else 2)
      data = "data_one_to_many" if row.catalog == "one_to_many" else "data"
      assert config.data.root == os.path.join(workdir, data)
      teacher = (os.path.join(workdir, row.teacher, f"seed_{seed}") if row.teacher else None)
      assert config.teacher.checkpoint == teacher
  with open(os.path.join(workdir, "data_one_to_many", "eval_normal", "queries.jsonl")) as f:
    assert any(len(json.loads(line)["item_ids"]) > 1 for line in f)
  with open(os.path.join(workdir, "data", "eval_normal", "queries.jsonl")) as f:
    assert all(len(json.loads(line)["item_ids"]) == 1 for line in f)

  # The table: every row, mean ± sample std of what the runs returned.
  markdown = _read(out)
  table = parse_table(markdown)
  assert list(table) == TABLE_LABELS
  saved = json.loads(_read(os.path.join(tmp_path, "docs", "results.json")))
  assert saved["command"] == report["command"] and f"`{saved['command']}`" in markdown
  entries = {entry["label"]: entry for entry in saved["rows"]}
  for row in paper_table.ROWS:
    if not row.in_table:
      assert row.label not in table and entries[row.label]["runs"]
      continue
    assert table[row.label]["n"] == "2"
    for column in COLUMNS:
      name, metric = column.split()
      split = f"eval_{name}"
      returned = [json.loads(_read(os.path.join(workdir, row.key, f"seed_{s}", "eval",
                                                "results.json")))[split][metric]
                  for s in (0, 1)]
      per_seed = [entries[row.label]["runs"][str(s)]["results"][split][metric] for s in (0, 1)]
      assert per_seed == returned
      mean, std = parse_cell(table[row.label][column])
      assert 0 <= mean <= 100
      assert mean == pytest.approx(np.mean(returned), abs=0.006)
      assert std == pytest.approx(np.std(returned, ddof=1), abs=0.006)

  # A rerun trains nothing; a third seed trains only that seed's runs.
  results_files = sorted(os.path.join(d, "eval", "results.json") for d in dirs)
  mtimes = [os.stat(path).st_mtime_ns for path in results_files]

  def no_training(*unused_args, **unused_kwargs):
    raise AssertionError("a finished run was trained again")
  monkeypatch.setattr(trainer, "train_and_evaluate", no_training)
  paper_table.run_table(workdir, seeds=[0, 1], **args)
  assert [os.stat(path).st_mtime_ns for path in results_files] == mtimes
  assert parse_table(_read(out)) == table
  fake.calls.clear()
  monkeypatch.setattr(trainer, "train_and_evaluate", fake)
  paper_table.run_table(workdir, seeds=[0, 1, 2], **args)
  assert [os.path.relpath(d, workdir) for d, _ in fake.calls] == [
      f"{row.key}/seed_2" for row in paper_table.ROWS]
  assert all(cells["n"] == "3" for cells in parse_table(_read(out)).values())


def test_cli_trains_for_real(tmp_path):
  """The command itself on the micro preset: the full TIGER-FG row and its teacher."""
  workdir, out = str(tmp_path / "table"), str(tmp_path / "results.md")
  command = [sys.executable, "-m", "tigerfg_jax.experiments.paper_table",
             f"--workdir={workdir}", "--preset=micro", "--seeds=0", "--rows=spatial_map",
             "--steps=2", "--items=8", "--image_size=32", f"--out={out}"]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[1/2] teacher seed=0: training in" in proc.stdout
  assert "[2/2] spatial_map seed=0: training in" in proc.stdout

  run = os.path.join(workdir, "spatial_map", "seed_0")
  teacher = os.path.join(workdir, "teacher", "seed_0")
  assert workdir_lib.load_config(run).teacher.checkpoint == teacher
  assert workdir_lib.load_config(teacher).stage == "teacher"
  assert not os.path.exists(os.path.join(run, "teacher"))  # not trained a second time
  results = json.loads(_read(os.path.join(run, "eval", "results.json")))
  table = parse_table(_read(out))
  label = paper_table.ROWS_BY_KEY["spatial_map"].label
  assert list(table) == [label]
  for column in COLUMNS:
    name, metric = column.split()
    mean, std = parse_cell(table[label][column])
    assert std is None and 0 <= mean <= 100
    assert mean == pytest.approx(results[f"eval_{name}"][metric], abs=0.006)
  assert ("`python -m tigerfg_jax.experiments.paper_table " + " ".join(command[3:]) + "`"
          in _read(out))
