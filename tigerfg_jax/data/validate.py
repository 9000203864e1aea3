"""Checks a dataset folder without training and without writing anything into it.

  python -m tigerfg_jax.data.validate --root=DIR [--skip_bad]
  tigerfg-validate --root=DIR [--skip_bad]

Reads every split a run reads (`train`, then each `eval*` folder), decodes every image
and prints per split the valid items and queries (queries with and without a box) and
the bad records, then every problem, one line each (docs/DATA.md lists the checks).
Exits 0 when a run with the same `skip_bad` (`--config.data.skip_bad`) would accept the
folder, 1 otherwise. Nothing is cached: a run ingests the folder anew.
"""

from __future__ import annotations

import sys

from absl import flags

from tigerfg_jax import cli
from tigerfg_jax.data import folder


def split_report(root: str, split: str, skip_bad: bool) -> tuple[list[str], bool]:
  """(report lines, valid) of `root/split`: a summary line, then one line per problem."""
  try:
    records, problems = folder.scan_split(root, split, skip_bad=skip_bad)
  except folder.DatasetError as e:
    return [f"{split}: cannot be read"] + [f"  {p}" for p in e.problems], False
  with_box = sum(q.box is not None for q in records.queries)
  bad = f"{len(problems)} bad record(s)" + (" skipped" if skip_bad and problems else "")
  lines = [f"{split}: {len(records.items)} items, {len(records.queries)} queries "
           f"({with_box} with a box, {len(records.queries) - with_box} without), "
           f"{len(records.text_queries)} text queries, {bad}"]
  try:
    folder.check_scan(records, problems, skip_bad)
    valid = True
  except folder.DatasetError as e:
    lines.append(f"  {str(e).splitlines()[0]}")
    valid = False
  prefix = "skipped: " if skip_bad else ""
  return lines + [f"  {prefix}{p}" for p in problems], valid


def report(root: str, skip_bad: bool) -> tuple[list[str], bool]:
  """(report lines, valid) of every split of `root`; the last line is the verdict."""
  try:
    names = folder.split_names(root)
  except folder.DatasetError as e:
    return [str(e)], False
  lines, invalid = [], []
  for name in names:
    split_lines, valid = split_report(root, name, skip_bad)
    lines += split_lines
    if not valid:
      invalid.append(name)
  if invalid:
    lines.append(f"{root}: INVALID ({len(invalid)} of {len(names)} split(s): "
                 f"{', '.join(invalid)})")
  else:
    lines.append(f"{root}: valid ({len(names)} split(s): {', '.join(names)})")
  return lines, not invalid


def define_flags() -> None:
  flags.DEFINE_string("root", None, "dataset folder: train/ and eval*/ split folders "
                      "(docs/DATA.md)", required=True)
  flags.DEFINE_bool("skip_bad", False, "accept bad records as a run with "
                    f"{folder.SKIP_BAD_FLAG} would: they are listed as skipped")


def main(argv: list[str]) -> None:
  cli.no_arguments(argv)
  lines, valid = report(flags.FLAGS.root, flags.FLAGS.skip_bad)
  print("\n".join(lines))
  sys.exit(0 if valid else 1)


def run() -> None:
  """Console-script entry point (tigerfg-validate)."""
  cli.run(main, define_flags, "tigerfg-validate")


if __name__ == "__main__":
  run()
