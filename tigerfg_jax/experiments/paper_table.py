r"""The paper's ablation table on the synthetic benchmark, trained and written in one go.

  python -m tigerfg_jax.experiments.paper_table [--workdir=runs/paper_table] \
      [--preset=tiny] [--seeds=0,1,2] [--rows=clip_style,...] [--out=docs/results.md]

Rows (each adds one piece to the one above; `ROWS` below is the whole recipe):

  clip_style       configs/clip_style.py: global pooling + title fusion, InfoNCE, no
                   Mosaic; as many steps as the teacher and the student together.
  text_guided      configs/distill.py with every term but L_q2i off, no title-swap
                   negatives, no Mosaic, no teacher (equal compute: twice the steps).
  mosaic           + the default Mosaic probability.
  title_swap       + title-swap hard negatives in L_q2i.
  v2t_i2v          + L_v2t and L_i2v; the teacher (row `teacher`: it retrieves with
                   the ground-truth crops, and its attention on the whole item image
                   learns the box) starts the student with its weights and its crop
                   embeddings are L_i2v's targets (from here on: the teacher's steps
                   + the student's).
  sdd              + the similarity-distribution KL to the teacher.
  srd              + the spatial-relation KL to the teacher's patch tokens.
  spatial_map      + the spatial-map loss (weight 0.5): the paper's whole objective,
                   one look at each item.
  zoom             configs/distill.py as is: the full TIGER-FG, each item embedded
                   whole and zoomed to its attention's region, then to the region the
                   crop's attention picks (models/zoom.py), the spatial map weighted 4.
  one_to_many      the full TIGER-FG on a one-to-many catalog (its own teacher); a hit
                   is any of the query's positives.

Every row runs the real configs/*.py at the preset, then the row's overrides, then the
seed, the catalog and the teacher. All rows but one_to_many share one synthetic catalog
(DIR/data); the teachers (`teacher`, `teacher_one_to_many`) are trained once per seed in
their own workdirs and handed to the distillation rows through `teacher.checkpoint`.
Each row x seed trains in DIR/<row>/seed_<s>; a run whose eval/results.json exists is
not trained again, so rerunning the command resumes (an interrupted run resumes from its
checkpoint). The table (mean ± sample std over seeds) goes to --out, the per-seed numbers
to the JSON next to it. The CLI keeps a persistent XLA compilation cache in
DIR/jax_cache: the seeds and most rows compile the same programs.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import statistics
import time
from typing import Any, Sequence

import jax
import ml_collections
from absl import flags

from tigerfg_jax import cli
from tigerfg_jax import config_lib
from tigerfg_jax.data import synthetic
from tigerfg_jax.evaluation import box_oracle
from tigerfg_jax.training import trainer

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")
TABLE_SPLITS = ("eval_normal", "eval_cluttered")
TABLE_METRICS = ("R@1", "R@5", "R@10")
# The box oracle's columns (same checkpoint): each item pooled only from its true box,
# and each item embedded (one look) from its true box's context crop.
BOX_ORACLE_SPLIT = "eval_cluttered"
BOX_ORACLE_COLUMNS = {"box": "true box", "crop": "true crop"}
BASELINE = "clip_style"
CATALOG_DIRS = {"default": "data", "one_to_many": "data_one_to_many"}
_RUN_RECORD = "paper_table_run.json"

_NO_TEACHER = {"loss.w_i2v": 0.0, "loss.w_sdd": 0.0, "loss.w_srd": 0.0,
               "teacher.init_student": False}
# Rows without L_v2t also leave its query view off, so that key comes in with the term.
_NO_V2T = {"loss.w_v2t": 0.0, "loss.v2t_query": False}
# The paper's model looks at each item once (the attention zoom is the last row).
_ONE_LOOK = {"model.zoom_threshold": 0.0, "model.zoom_refinements": 0}
_Q2I_ONLY = {**_NO_TEACHER, **_NO_V2T, **_ONE_LOOK, "loss.w_spatial_map": 0.0,
             "loss.hard_negatives": 0}


@dataclasses.dataclass(frozen=True)
class Row:
  """One configuration of the table, trained once per seed.

  Attributes:
    key: its workdir folder under DIR and its name for --rows.
    label: its name in the table.
    config_file: the file under configs/ that builds its config.
    overrides: dotted config keys set after the config file (`{'loss.w_sim': 0.0}`).
    catalog: 'default' or 'one_to_many' (CATALOG_DIRS).
    teacher: key of the row whose run (same seed) is its frozen teacher, or None.
    in_table: False for the helper runs (the teachers); they are still in the JSON.
    equal_compute: a row without a teacher trains twice the steps, as many as the
      teacher's and the student's together.
  """
  key: str
  label: str
  config_file: str
  overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
  catalog: str = "default"
  teacher: str | None = None
  in_table: bool = True
  equal_compute: bool = False


# Teachers come before the rows that read them: runs go in this order.
ROWS = (
    Row("teacher", "privileged teacher (stage 1)", "teacher.py", in_table=False),
    Row("clip_style", "clip_style (equal compute)", "clip_style.py", equal_compute=True),
    Row("text_guided", "+ text-guided pooling", "distill.py",
        {**_Q2I_ONLY, "data.mosaic_prob": 0.0}, equal_compute=True),
    Row("mosaic", "+ Mosaic", "distill.py", dict(_Q2I_ONLY), equal_compute=True),
    Row("title_swap", "+ title-swap hard negatives", "distill.py",
        {**_NO_TEACHER, **_NO_V2T, **_ONE_LOOK, "loss.w_spatial_map": 0.0},
        equal_compute=True),
    Row("v2t_i2v", "+ v2t / i2v (teacher init + target)", "distill.py",
        {**_ONE_LOOK, "loss.w_sdd": 0.0, "loss.w_srd": 0.0, "loss.w_spatial_map": 0.0},
        teacher="teacher"),
    Row("sdd", "+ similarity KL (SDD)", "distill.py",
        {**_ONE_LOOK, "loss.w_srd": 0.0, "loss.w_spatial_map": 0.0}, teacher="teacher"),
    Row("srd", "+ spatial relations (SRD)", "distill.py",
        {**_ONE_LOOK, "loss.w_spatial_map": 0.0}, teacher="teacher"),
    Row("spatial_map", "+ spatial map (the paper's TIGER-FG)", "distill.py",
        {**_ONE_LOOK, "loss.w_spatial_map": 0.5}, teacher="teacher"),
    Row("zoom", "+ attention zoom (full TIGER-FG)", "distill.py", teacher="teacher"),
    Row("teacher_one_to_many", "privileged teacher (stage 1), one-to-many catalog",
        "teacher.py", catalog="one_to_many", in_table=False),
    Row("one_to_many", "full TIGER-FG, one-to-many catalog", "distill.py",
        catalog="one_to_many", teacher="teacher_one_to_many"),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}
TABLE_ROW_KEYS = tuple(row.key for row in ROWS if row.in_table)


# ---------------------------------------------------------------------- configs ---

def load_config_file(path: str, arg: str | None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `config_flags` loads `--config=path:arg`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path} not found (configs/ is expected next to "
                            "the tigerfg_jax package, in the repository root)")
  name = "tigerfg_jax_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg is not None else module.get_config()


def row_config(row: Row, *, preset: str, seed: int, data_root: str,
               teacher_dir: str | None, steps: int | None) -> ml_collections.ConfigDict:
  """The full config of one row x seed.

  `steps`: the student's steps (None: the preset's); equal-compute rows take twice.
  """
  config = load_config_file(os.path.join(CONFIGS_DIR, row.config_file), preset)
  config_lib.apply_overrides(config, row.overrides)
  config.seed = seed
  config.data.root = data_root
  if teacher_dir is not None:
    config.teacher.checkpoint = teacher_dir
  base = steps if steps is not None else config_lib.PRESETS[preset].steps
  config_lib.set_steps(config.train, base * (2 if row.equal_compute else 1))
  # The same features pooled from the true box, beside the deployed numbers.
  config.evals.box_oracle.at_end = (config.model.mode == "tiger"
                                    and config.stage != "text_query")
  return config


# ---------------------------------------------------------------------- catalog ---

def catalog_params(preset: str, items: int | None, image_size: int | None,
                   one_to_many: bool) -> dict[str, Any]:
  """write_catalog arguments: the preset's synthetic data settings unless overridden."""
  params = synthetic.catalog_params(config_lib.experiment_config("teacher", preset).data)
  if items is not None:
    params.update(items=items, eval_items=None)
  if image_size is not None:
    params["image_size"] = image_size
  return dict(params, one_to_many=one_to_many)


# ------------------------------------------------------------------------- runs ---

def rows_to_run(keys: Sequence[str]) -> list[Row]:
  """The rows named by `keys` plus the teachers they need, in ROWS order."""
  unknown = [k for k in keys if k not in ROWS_BY_KEY]
  if unknown:
    raise ValueError(f"--rows: unknown row(s) {unknown}; expected keys of {list(ROWS_BY_KEY)}")
  wanted = set(keys)
  wanted |= {ROWS_BY_KEY[k].teacher for k in keys if ROWS_BY_KEY[k].teacher}
  return [row for row in ROWS if row.key in wanted]


def run_dir(workdir: str, row: Row, seed: int) -> str:
  return os.path.join(workdir, row.key, f"seed_{seed}")


def read_results(directory: str) -> dict[str, dict[str, Any]] | None:
  """A finished run's `{split: metrics}`, or None while it has no eval/results.json."""
  path = os.path.join(directory, "eval", "results.json")
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_box_oracle(directory: str) -> dict[str, dict[str, Any]] | None:
  """A finished run's `{split: {'deployed', 'box'}}` (evals.box_oracle), or None."""
  path = os.path.join(directory, "eval", box_oracle.RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_wall_time(directory: str) -> float | None:
  path = os.path.join(directory, _RUN_RECORD)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)["wall_s"]


def train_row(config: ml_collections.ConfigDict, directory: str) -> dict[str, Any]:
  """Trains and evaluates one run; records its wall time next to its results."""
  start = time.monotonic()
  results = trainer.train_and_evaluate(config, directory)
  with open(os.path.join(directory, _RUN_RECORD), "w", encoding="utf-8") as f:
    json.dump({"wall_s": time.monotonic() - start}, f)
  return results


# ----------------------------------------------------------------------- report ---

def summarize(values: Sequence[float]) -> tuple[float, float | None]:
  """(mean, sample standard deviation) of per-seed values; std is None for one seed."""
  values = [float(v) for v in values]
  return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: Sequence[float]) -> str:
  mean, std = summarize(values)
  return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _row_values(entry: dict[str, Any], split: str, metric: str) -> list[float]:
  return [run["results"][split][metric] for run in entry["runs"].values()]


def _signed(value: float) -> str:
  return f"{value:+.2f}"


def format_report(report: dict[str, Any], json_name: str) -> str:
  """The Markdown page: the table, the deltas vs clip_style and how it was made."""
  entries = [entry for entry in report["rows"] if entry["in_table"]]
  split_names = {"eval_normal": "normal", "eval_cluttered": "cluttered"}
  header = (["row", "n"] + [f"{split_names[s]} {m}" for s in TABLE_SPLITS for m in TABLE_METRICS]
            + [f"{BOX_ORACLE_SPLIT.removeprefix('eval_')} R@1, {name}"
               for name in BOX_ORACLE_COLUMNS.values()])
  lines = [
      "# TIGER-FG ablation on the synthetic benchmark",
      "",
      f"Recall@k in % (a hit: any of the query's positive items in the top k), mean ± "
      f"sample standard deviation over the n training seeds "
      f"({', '.join(map(str, report['seeds']))}; the catalog is the same for all); "
      f"preset `{report['preset']}`"
      + (f", {report['steps']} training steps per teacher / student run (rows without "
         "a teacher: twice as many)" if report["steps"] else "")
      + ". Each row adds one piece to the row above it. `normal`: one product per item "
      "image; `cluttered`: the titled product among distractors on a busy background. "
      "`true box`: the same checkpoint with each item pooled only from its ground-truth "
      "box (`evaluation.box_oracle`): what perfect grounding would give its features. "
      "`true crop`: each item embedded in one look from the square context crop around "
      "its box, the privileged teacher's view: what a perfect zoom (or detector) would "
      "give these weights (– where the run predates the column).",
      "",
      "| " + " | ".join(header) + " |",
      "|" + "---|" * len(header),
  ]
  for entry in entries:
    cells = [entry["label"], str(len(entry["runs"]))]
    cells += [format_cell(_row_values(entry, s, m)) for s in TABLE_SPLITS for m in TABLE_METRICS]
    for name in BOX_ORACLE_COLUMNS:
      oracle = [run["box_oracle"][BOX_ORACLE_SPLIT][name]["R@1"]
                for run in entry["runs"].values()
                if run.get("box_oracle") and name in run["box_oracle"][BOX_ORACLE_SPLIT]]
      cells.append(format_cell(oracle) if oracle else "–")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  by_key = {entry["key"]: entry for entry in entries}
  if BASELINE in by_key:
    lines += [f"Delta vs `{BASELINE}` (R@1, percentage points, mean over the same seeds):", ""]
    for entry in entries:
      if entry["key"] == BASELINE or entry["catalog"] != by_key[BASELINE]["catalog"]:
        continue
      deltas = {s: summarize(_row_values(entry, s, "R@1"))[0]
                - summarize(_row_values(by_key[BASELINE], s, "R@1"))[0] for s in TABLE_SPLITS}
      lines.append(f"- {entry['label']}: cluttered {_signed(deltas['eval_cluttered'])}, "
                   f"normal {_signed(deltas['eval_normal'])}")
    lines.append("")
  if any(entry["catalog"] == "one_to_many" for entry in entries):
    lines += ["The one-to-many row runs on its own catalog (each product listed by 1-3 "
              "items, every one a positive of its queries), so it is not compared with "
              f"`{BASELINE}`.", ""]
  hardware = report["hardware"]
  wall = report["wall_s"]
  lines += [
      "## How this was made",
      "",
      f"- Command: `{report['command']}`",
      f"- Hardware: {hardware['cpu']}, {hardware['cores']} cores; JAX {hardware['jax_version']} "
      f"devices: {hardware['jax_devices']}",
      f"- Wall time: {wall['runs']:.0f} s of training + evaluation summed over the "
      f"{wall['num_runs']} runs (teachers included); this invocation took "
      f"{wall['invocation']:.0f} s",
      f"- Date: {report['date']}",
      "- Catalogs: " + "; ".join(f"`{name}` {params}" for name, params
                                  in report["catalogs"].items()),
      f"- Per-seed numbers (all metrics, teachers included): `{json_name}`",
      "",
  ]
  return "\n".join(lines)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
  """CPU model, core count, JAX version and devices ('1 x gpu (NVIDIA H100 ...)')."""
  devices = collections.Counter(
      d.platform if d.device_kind == d.platform else f"{d.platform} ({d.device_kind})"
      for d in jax.devices())
  return {"cpu": _cpu_model(), "cores": os.cpu_count(), "jax_version": jax.__version__,
          "jax_devices": ", ".join(f"{count} x {kind}" for kind, count in devices.items())}


def command_line(*, workdir: str, preset: str, seeds: Sequence[int], rows: Sequence[str],
                 steps: int | None, items: int | None, image_size: int | None,
                 out: str) -> str:
  """The CLI call that reproduces a `run_table` call."""
  parts = ["python -m tigerfg_jax.experiments.paper_table", f"--workdir={workdir}",
           f"--preset={preset}", f"--seeds={','.join(map(str, seeds))}",
           f"--rows={','.join(rows)}"]
  for name, value in (("steps", steps), ("items", items), ("image_size", image_size)):
    if value is not None:
      parts.append(f"--{name}={value}")
  parts.append(f"--out={out}")
  return " ".join(parts)


def _shown_image_r1(results: dict[str, dict[str, Any]]) -> str:
  return ", ".join(f"{s} R@1={results[s]['R@1']:.2f}" for s in TABLE_SPLITS)


def train_rows(workdir: str, todo: Sequence[Row], rows_by_key: dict[str, Row],
               seeds: Sequence[int], roots: dict[str, str], *, preset: str,
               steps: int | None, shown) -> dict[str, dict[str, Any]]:
  """Trains (or reuses) every row x seed of `todo`, seed by seed; returns the entries.

  `rows_by_key` finds each row's teacher; `roots` the dataset root of each catalog
  name; `shown(results) -> str` is the progress line's summary of a finished run.
  """
  entries = {row.key: {"key": row.key, "label": row.label, "config": f"configs/{row.config_file}",
                       "overrides": row.overrides, "catalog": row.catalog,
                       "teacher": row.teacher, "in_table": row.in_table, "runs": {}}
             for row in todo}
  total = len(todo) * len(seeds)
  count = 0
  for seed in seeds:
    for row in todo:
      count += 1
      directory = run_dir(workdir, row, seed)
      prefix = f"[{count}/{total}] {row.key} seed={seed}"
      results = read_results(directory)
      if results is None:
        print(f"{prefix}: training in {directory}", flush=True)
        teacher_dir = (run_dir(workdir, rows_by_key[row.teacher], seed) if row.teacher
                       else None)
        config = row_config(row, preset=preset, seed=seed, data_root=roots[row.catalog],
                            teacher_dir=teacher_dir, steps=steps)
        results = train_row(config, directory)
      else:
        print(f"{prefix}: finished earlier, reusing {directory}/eval/results.json", flush=True)
      print(f"{prefix}: {shown(results)}", flush=True)
      entries[row.key]["runs"][str(seed)] = {"workdir": directory, "results": results,
                                             "box_oracle": read_box_oracle(directory),
                                             "wall_s": _read_wall_time(directory)}
  return entries


# ------------------------------------------------------------------------ table ---

def run_table(workdir: str, *, preset: str = "tiny", seeds: Sequence[int] = (0, 1, 2),
              rows: Sequence[str] = TABLE_ROW_KEYS, steps: int | None = None,
              items: int | None = None, image_size: int | None = None,
              out: str = "docs/results.md") -> dict[str, Any]:
  """Trains (or reuses) every row x seed, writes `out` and its JSON; returns the JSON.

  Args:
    workdir: DIR: catalogs in DIR/data*, runs in DIR/<row>/seed_<s>.
    preset: config preset for every run ('micro' | 'tiny' | 'b16').
    seeds: training seeds (config.seed); the catalogs do not change with them.
    rows: keys of the table rows to run (ROWS); their teachers are added.
    steps: config.train.steps of every run (None: the preset's).
    items, image_size: synthetic catalog size (None: the preset's data settings).
    out: the Markdown file; the JSON goes next to it with the .json extension.
  """
  start = time.monotonic()
  if not seeds:
    raise ValueError("--seeds: need at least one seed")
  todo = rows_to_run(rows)
  catalogs = {name: catalog_params(preset, items, image_size, name == "one_to_many")
              for name in sorted({row.catalog for row in todo})}
  roots = {name: synthetic.write_catalog_once(os.path.join(workdir, CATALOG_DIRS[name]),
                                              **params)
           for name, params in catalogs.items()}

  entries = train_rows(workdir, todo, ROWS_BY_KEY, seeds, roots, preset=preset,
                       steps=steps, shown=_shown_image_r1)
  total = len(todo) * len(seeds)
  run_walls = [run["wall_s"] for entry in entries.values() for run in entry["runs"].values()
               if run["wall_s"] is not None]
  report = {
      "command": command_line(workdir=workdir, preset=preset, seeds=seeds, rows=rows,
                              steps=steps, items=items, image_size=image_size, out=out),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "hardware": hardware(),
      "preset": preset,
      "steps": steps,
      "seeds": list(seeds),
      "catalogs": catalogs,
      "rows": list(entries.values()),
      "wall_s": {"invocation": time.monotonic() - start, "runs": sum(run_walls),
                 "num_runs": total},
  }
  write_report(report, out, format_report)
  return report


def write_report(report: dict[str, Any], out: str, format_fn) -> None:
  """Writes `report` as JSON next to `out` (.json) and `format_fn(report, json name)`
  as the Markdown file `out`."""
  json_path = os.path.splitext(out)[0] + ".json"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  with open(out, "w", encoding="utf-8") as f:
    f.write(format_fn(report, os.path.basename(json_path)))
  print(f"wrote {out} and {json_path}", flush=True)


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/paper_table", "catalogs, runs and the XLA cache")
  flags.DEFINE_enum("preset", "tiny", list(config_lib.PRESETS), "config preset of every run")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "training seeds")
  flags.DEFINE_list("rows", list(TABLE_ROW_KEYS),
                    f"table rows, of {', '.join(TABLE_ROW_KEYS)}")
  flags.DEFINE_integer("steps", None, "train.steps of the teachers and students (default: "
                       "the preset's); rows without a teacher train twice as many")
  flags.DEFINE_integer("items", None, "synthetic train items (default: the preset's)")
  flags.DEFINE_integer("image_size", None, "synthetic image side (default: the preset's)")
  flags.DEFINE_string("out", "docs/results.md", "Markdown table; the JSON goes next to it")


def main(argv):
  cli.no_arguments(argv)
  args = flags.FLAGS
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  try:
    seeds = [int(seed) for seed in args.seeds]
  except ValueError as e:
    raise ValueError(f"--seeds={','.join(args.seeds)}: expected integers") from e
  run_table(args.workdir, preset=args.preset, seeds=seeds, rows=args.rows,
            steps=args.steps, items=args.items, image_size=args.image_size, out=args.out)


def run() -> None:
  cli.run(main, define_flags, "tigerfg_jax.experiments.paper_table")


if __name__ == "__main__":
  run()
