"""The package's import graph goes down only (docs/ARCHITECTURE.md "Layout").

Read from the source with `ast`, not by importing, so a lazy import inside a function
counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tigerfg_jax"

# What each part of the package may import from tigerfg_jax (besides itself).
# `cli` (absl only) is shared by every command line.
ALLOWED = {
    "cli": set(),
    "index": set(),
    "runpath": set(),
    "data": {"cli"},
    "models": {"cli"},
    "losses": {"models"},
    "sharding": {"models"},
    "config_lib": {"index", "losses", "models", "runpath"},
    "workdir": {"config_lib", "data", "models", "runpath", "sharding"},
    "evaluation": {"cli", "config_lib", "data", "index", "models", "runpath", "sharding",
                   "workdir"},
    "convert": {"cli", "config_lib", "data", "models", "sharding", "workdir"},
    "serving": {"cli", "data", "evaluation", "index", "models", "runpath", "sharding",
                "workdir"},
    "training": {"config_lib", "data", "evaluation", "losses", "models", "runpath",
                 "sharding", "workdir"},
    "experiments": {"cli", "config_lib", "data", "evaluation", "training", "workdir"},
    "main": {"cli", "training"},
    "aot_check": {"cli", "config_lib", "models", "sharding", "training", "workdir"},
}


def _part(module: str) -> str:
  """'tigerfg_jax.serving.export' -> 'serving'."""
  return module.split(".")[1]


def _imports(path: pathlib.Path) -> set[str]:
  """The tigerfg_jax modules a file imports (`import x` and `from x import y` forms)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name.startswith("tigerfg_jax.")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module == "tigerfg_jax":
        found |= {f"tigerfg_jax.{a.name}" for a in node.names}
      elif node.module.startswith("tigerfg_jax."):
        found.add(node.module)
  return found


def _sources() -> list[pathlib.Path]:
  return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"
                or p.parent != PACKAGE)


def test_every_part_of_the_package_has_a_rule():
  parts = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _sources()}
  assert parts <= set(ALLOWED), f"no import rule for {parts - set(ALLOWED)}"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path):
  part = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
  bad = sorted(m for m in _imports(path)
               if _part(m) != part and _part(m) not in ALLOWED[part])
  assert not bad, f"{path.relative_to(PACKAGE)} ({part}) imports {bad}"


@pytest.mark.parametrize("part", ["serving", "convert", "evaluation"])
def test_readers_of_a_finished_run_never_import_training(part):
  for path in (PACKAGE / part).rglob("*.py"):
    assert not any(_part(m) == "training" for m in _imports(path)), path


def test_import_rules_have_no_cycle():
  def reaches(start, goal, seen=()):
    return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n)))
               for n in ALLOWED[start])
  assert not [p for p in ALLOWED if reaches(p, p)]


def test_the_reader_sees_imports_inside_functions(tmp_path):
  source = tmp_path / "x.py"
  source.write_text("def f():\n  from tigerfg_jax.training import trainer\n"
                    "import tigerfg_jax.serving.artifact\nfrom tigerfg_jax import cli\n")
  assert _imports(source) == {"tigerfg_jax.training", "tigerfg_jax.serving.artifact",
                              "tigerfg_jax.cli"}
