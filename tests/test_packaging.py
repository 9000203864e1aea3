"""Tests of the package metadata (pyproject.toml): it installs, and its console scripts
name functions that exist."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the build reads; copied so the build's scratch folders stay out of the checkout.
_SOURCES = ("pyproject.toml", "requirements.txt", "README.md", "tigerfg_jax")


def _pyproject() -> dict:
  with open(os.path.join(_REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_install_into_a_folder_imports_the_installed_copy(tmp_path):
  source, target = tmp_path / "source", tmp_path / "target"
  source.mkdir()
  for name in _SOURCES:
    path = os.path.join(_REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, source / name)
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                  "--no-cache-dir", "--quiet", "--target", str(target), str(source)],
                 check=True, capture_output=True)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = dict(os.environ, PYTHONPATH=str(target))
  result = subprocess.run(
      [sys.executable, "-c", "import tigerfg_jax, tigerfg_jax.data.validate as v, sys; "
       "print(tigerfg_jax.__file__); print(v.__file__)"],
      cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
  for path in result.stdout.split():
    assert os.path.commonpath([path, str(target)]) == str(target), path
  for script in _pyproject()["project"]["scripts"]:
    assert os.path.isfile(target / "bin" / script), script
  installed = {os.path.relpath(os.path.join(d, n), target / "tigerfg_jax")
               for d, _, names in os.walk(target / "tigerfg_jax") for n in names
               if n.endswith(".py")}
  assert {"__init__.py", "data/validate.py", "data/synthetic.py", "models/__init__.py"} <= installed


def test_console_scripts_name_run_functions_of_existing_modules():
  scripts = _pyproject()["project"]["scripts"]
  assert set(scripts) == {"tigerfg-train", "tigerfg-export", "tigerfg-search",
                          "tigerfg-validate"}
  for name, target in scripts.items():
    module, function = target.split(":")
    assert function == "run", name
    path = os.path.join(_REPO, *module.split(".")) + ".py"
    assert os.path.isfile(path), f"{name}: {path} does not exist"
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert "run" in functions, f"{name}: {path} has no top-level def run()"
    arguments = functions["run"].args
    assert not arguments.args and not arguments.kwonlyargs, f"{name}: run() takes arguments"


def test_metadata_and_requirements_file():
  project = _pyproject()["project"]
  assert (project["name"], project["version"]) == ("tigerfg-jax", "0.1.0")
  assert project["requires-python"] == ">=3.11" and project["dynamic"] == ["dependencies"]
  assert _pyproject()["tool"]["setuptools"]["dynamic"]["dependencies"] == {
      "file": ["requirements.txt"]}
  with open(os.path.join(_REPO, "requirements.txt"), encoding="utf-8") as f:
    lines = [line.split("#")[0].strip() for line in f]
  requirements = [Requirement(line) for line in lines if line]  # raises on a bad line.
  assert {"jax", "flax", "grain", "tensorflow-datasets"} <= {r.name for r in requirements}
  assert all(str(r.specifier).startswith("==") for r in requirements)
