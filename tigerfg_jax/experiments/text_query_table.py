r"""Text queries over the multimodal catalog: the item fusions, and one model for both.

  python -m tigerfg_jax.experiments.text_query_table [--workdir=runs/text_query_table] \
      [--preset=tiny] [--seeds=0,1,2] [--rows=text,image,...] [--joint_seeds=0] \
      [--out=docs/results_text_queries.md]

Every row starts from the same per-seed teacher (configs/teacher.py with a text query
tower: image queries on this catalog; Beyond Text's domain-trained encoders): its ViT
and title encoder are copied, the rest of each item fusion starts fresh. Fusion rows
(configs/text_query.py, `model.item_fusion` set; text queries only, same steps each):
text (the text-only two-tower baseline), image, concat, beyond_text, smar, tiger.
Both-kinds rows: `image_only` (configs/joint.py with `loss.w_t2i=0`: the distill
objective alone) and `joint` (configs/joint.py: the distill objective plus text
queries), set against the `tiger` fusion row (text queries alone).
Runs, reuse and resumption as in `tigerfg_jax.experiments.paper_table`.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any, Sequence

import jax
from absl import flags

from tigerfg_jax import cli
from tigerfg_jax import config_lib
from tigerfg_jax.data import synthetic
from tigerfg_jax.evaluation import retrieval
from tigerfg_jax.experiments import paper_table
from tigerfg_jax.experiments.paper_table import Row

# Text queries are scored on every eval split; eval_text (a 2,000-item catalog at the
# tiny preset) is the benchmark: in the 200-item splits a kind and a colour name about
# two items, so the title alone puts a relevant item in the top 10.
TEXT_SPLITS = ("eval_text", "eval_normal", "eval_cluttered")
IMAGE_SPLITS = ("eval_normal", "eval_cluttered")
TEXT_METRICS = ("R@1", "R@10", "R@50", "NDCG@10", "mAP@10")
FUSIONS = ("text", "image", "concat", "beyond_text", "smar", "tiger")
FUSION_LABELS = {
    "text": "text-only two-tower (title)",
    "image": "image-only item",
    "concat": "concat (global image + title)",
    "beyond_text": "Beyond Text attention fusion",
    "smar": "SMAR (multi-task, per-query gate)",
    "tiger": "TIGER-FG item tower",
}
BASELINE = "text"
_TEXT_TOWER = {"model.text_query_encoder": "own"}

ROWS = (
    Row("teacher", "privileged teacher with a text tower", "teacher.py", dict(_TEXT_TOWER),
        in_table=False),
    *(Row(f, FUSION_LABELS[f], "text_query.py", {"model.item_fusion": f}, teacher="teacher")
      for f in FUSIONS),
    Row("image_only", "image queries only (distill)", "joint.py", {"loss.w_t2i": 0.0},
        teacher="teacher"),
    Row("joint", "both kinds (joint)", "joint.py", teacher="teacher"),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}
JOINT_ROWS = ("image_only", "joint")


def _text_row(split: str) -> str:
  return split + retrieval.TEXT_ROW


def _shown(results: dict[str, dict[str, Any]]) -> str:
  parts = [f"{s} image R@1={results[s]['R@1']:.2f}" for s in IMAGE_SPLITS if s in results]
  parts += [f"{s} text R@10={results[_text_row(s)]['R@10']:.2f}" for s in TEXT_SPLITS
            if _text_row(s) in results]
  return ", ".join(parts)


def _values(entry: dict[str, Any], row: str, metric: str) -> list[float]:
  return [run["results"][row][metric] for run in entry["runs"].values()
          if row in run["results"]]


def format_report(report: dict[str, Any], json_name: str) -> str:
  """The two tables (fusions on text queries; what each query kind costs the other)."""
  entries = {entry["key"]: entry for entry in report["rows"]}
  lines = [f"# Text queries: item fusions ({report['preset']} preset)", "",
           f"Command: `{report['command']}`", "",
           f"Date: {report['date']}; hardware: {report['hardware']['cpu']} "
           f"({report['hardware']['cores']} cores), JAX {report['hardware']['jax_version']}; "
           f"per-seed numbers in {json_name}. Mean ± sample std over seeds "
           f"{report['seeds']}.", ""]
  base = entries.get(BASELINE)
  for split in TEXT_SPLITS:
    lines += [f"## {split}: text queries", "",
              "| item side | " + " | ".join(TEXT_METRICS) + " | R@10 vs text-only |",
              "|---" * (len(TEXT_METRICS) + 2) + "|"]
    for key in FUSIONS:
      if key not in entries:
        continue
      cells = [paper_table.format_cell(_values(entries[key], _text_row(split), m))
               for m in TEXT_METRICS]
      delta = ""
      if base is not None:
        mine, theirs = (_values(entries[key], _text_row(split), "R@10"),
                        _values(base, _text_row(split), "R@10"))
        delta = f"{paper_table.summarize(mine)[0] - paper_table.summarize(theirs)[0]:+.2f}"
      lines.append(f"| {entries[key]['label']} | " + " | ".join(cells) + f" | {delta} |")
    lines.append("")
  joint = [k for k in ("tiger", *JOINT_ROWS) if k in entries]
  if any(k in entries for k in JOINT_ROWS):
    columns = ([f"{s} image R@1" for s in IMAGE_SPLITS]
               + [f"{s} text R@10" for s in TEXT_SPLITS])
    lines += ["## One model for both query kinds", "",
              "Each row's seeds in brackets. Blank: the run does not answer that kind.", "",
              "| objective | " + " | ".join(columns) + " |",
              "|---" * (len(columns) + 1) + "|"]
    for key in joint:
      cells = [paper_table.format_cell(_values(entries[key], s, "R@1"))
               if _values(entries[key], s, "R@1") else "" for s in IMAGE_SPLITS]
      cells += [paper_table.format_cell(_values(entries[key], _text_row(s), "R@10"))
                for s in TEXT_SPLITS]
      label = "text queries only (tiger)" if key == "tiger" else entries[key]["label"]
      label += f" [{', '.join(sorted(entries[key]['runs']))}]"
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def run_table(workdir: str, *, preset: str = "tiny", seeds: Sequence[int] = (0, 1, 2),
              rows: Sequence[str] = FUSIONS + JOINT_ROWS,
              joint_seeds: Sequence[int] = (0,), steps: int | None = None,
              out: str = "docs/results_text_queries.md") -> dict[str, Any]:
  """Trains (or reuses) the rows, writes `out` and its JSON; returns the JSON.

  Fusion rows run for `seeds`, the both-kinds rows (and their teacher) for
  `joint_seeds`; `steps`: the preset's when None.
  """
  start = time.monotonic()
  unknown = [r for r in rows if r not in ROWS_BY_KEY or r == "teacher"]
  if unknown or not seeds:
    raise ValueError(f"--rows: unknown {unknown}; expected of "
                     f"{list(FUSIONS + JOINT_ROWS)}; --seeds must not be empty")
  catalog = dict(paper_table.catalog_params(preset, None, None, False),
                 text_eval_items=config_lib.PRESETS[preset].synthetic_text_eval_items)
  roots = {"default": synthetic.write_catalog_once(os.path.join(workdir, "data"),
                                                   **catalog)}
  fusion_rows = [ROWS_BY_KEY[k] for k in ("teacher", *FUSIONS) if k in rows or k == "teacher"]
  both_rows = [ROWS_BY_KEY[k] for k in ("teacher", *JOINT_ROWS)
               if k == "teacher" and any(j in rows for j in JOINT_ROWS) or k in rows]
  entries = paper_table.train_rows(workdir, fusion_rows, ROWS_BY_KEY, seeds, roots,
                                   preset=preset, steps=steps, shown=_shown)
  if both_rows and joint_seeds:
    teacher_runs = entries["teacher"]["runs"]
    entries.update(paper_table.train_rows(workdir, both_rows, ROWS_BY_KEY, joint_seeds,
                                          roots, preset=preset, steps=steps, shown=_shown))
    entries["teacher"]["runs"].update(teacher_runs)
  parts = ["python -m tigerfg_jax.experiments.text_query_table", f"--workdir={workdir}",
           f"--preset={preset}", f"--seeds={','.join(map(str, seeds))}",
           f"--rows={','.join(rows)}", f"--joint_seeds={','.join(map(str, joint_seeds))}"]
  if steps is not None:
    parts.append(f"--steps={steps}")
  report = {
      "command": " ".join(parts + [f"--out={out}"]),
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "hardware": paper_table.hardware(),
      "preset": preset,
      "steps": steps,
      "seeds": list(seeds),
      "joint_seeds": list(joint_seeds),
      "catalog": catalog,
      "rows": list(entries.values()),
      "wall_s": {"invocation": time.monotonic() - start},
  }
  paper_table.write_report(report, out, format_report)
  return report


def define_flags() -> None:
  flags.DEFINE_string("workdir", "runs/text_query_table", "catalog, runs and the XLA cache")
  flags.DEFINE_enum("preset", "tiny", list(config_lib.PRESETS), "config preset of every run")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "training seeds of the fusion rows")
  flags.DEFINE_list("joint_seeds", ["0"], "training seeds of the both-kinds rows")
  flags.DEFINE_list("rows", list(FUSIONS + JOINT_ROWS), "rows to run")
  flags.DEFINE_integer("steps", None, "train.steps of every run (default: the preset's)")
  flags.DEFINE_string("out", "docs/results_text_queries.md",
                      "Markdown tables; the JSON goes next to it")


def main(argv):
  cli.no_arguments(argv)
  args = flags.FLAGS
  jax.config.update("jax_compilation_cache_dir", os.path.join(args.workdir, "jax_cache"))
  try:
    seeds = [int(s) for s in args.seeds]
    joint_seeds = [int(s) for s in args.joint_seeds]
  except ValueError as e:
    raise ValueError("--seeds / --joint_seeds: expected integers") from e
  run_table(args.workdir, preset=args.preset, seeds=seeds, rows=args.rows,
            joint_seeds=joint_seeds, steps=args.steps, out=args.out)


def run() -> None:
  cli.run(main, define_flags, "tigerfg_jax.experiments.text_query_table")


if __name__ == "__main__":
  run()
