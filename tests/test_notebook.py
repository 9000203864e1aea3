"""launch/colab_tpu.ipynb: committed clean, Colab-only imports guarded, and it runs.

The run executes every cell in a Jupyter kernel started in the repository root, with the
`micro` preset on the CPU, and checks what the notebook shows: the results table, the
attention picture and the search hits.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "launch", "colab_tpu.ipynb")
KERNEL = "tigerfg_notebook_test"


def _colab_imports_outside_if(source: str) -> list[int]:
  """Lines of `google.colab` imports that no `if` statement encloses."""
  tree = ast.parse(source)
  parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
  bad = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      names = [node.module or ""]
    else:
      continue
    if not any(name == "google.colab" or name.startswith("google.colab.") for name in names):
      continue
    ancestor = parent.get(node)
    while ancestor is not None and not isinstance(ancestor, ast.If):
      ancestor = parent.get(ancestor)
    if ancestor is None:
      bad.append(node.lineno)
  return bad


def test_colab_import_check_sees_module_level_imports():
  assert _colab_imports_outside_if("from google.colab import drive\n") == [1]
  assert _colab_imports_outside_if("import google.colab.drive\nx = 1\n") == [1]
  assert _colab_imports_outside_if("if x:\n  from google.colab import drive\n") == []
  assert _colab_imports_outside_if("def f():\n  import google.colab\n") == [2]


def test_committed_notebook_is_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code_cells
  for cell in code_cells:
    assert cell.outputs == [], f"cell {cell.id} has outputs"
    assert cell.execution_count is None, f"cell {cell.id} has an execution count"
    assert _colab_imports_outside_if(cell.source) == [], (
        f"cell {cell.id}: google.colab imported outside an `if`")
  assert any("google.colab" in cell.source for cell in code_cells)
  settings = "\n".join(cell.source for cell in code_cells)
  assert re.search(r'^MOUNT_DRIVE = False  # @param \{type:"boolean"\}$', settings, re.M)
  assert re.search(r'^PROJECT_SOURCE = .*# @param', settings, re.M)


def _write_kernelspec(jupyter_dir: str) -> None:
  """A kernel that runs this interpreter (the one with the project's requirements).

  The `python3` spec ipykernel installs would also resolve to it inside a venv, but a
  user-level `python3` spec can shadow it elsewhere; this one is found through JUPYTER_PATH.
  """
  spec_dir = os.path.join(jupyter_dir, "kernels", KERNEL)
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, "kernel.json"), "w", encoding="utf-8") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "tigerfg test", "language": "python"}, f)


def _texts(cell) -> list[str]:
  texts = []
  for output in cell.outputs:
    if output.output_type == "stream":
      texts.append(output.text)
    elif output.output_type in ("display_data", "execute_result"):
      texts.extend(value for mime, value in output.data.items() if mime.startswith("text/"))
  return texts


def test_notebook_runs_on_cpu_with_micro_preset(tmp_path, monkeypatch):
  jupyter_dir = str(tmp_path / "jupyter")
  _write_kernelspec(jupyter_dir)
  monkeypatch.setenv("JUPYTER_PATH", jupyter_dir)
  monkeypatch.setenv("TIGERFG_NOTEBOOK_PRESET", "micro")
  monkeypatch.setenv("TIGERFG_NOTEBOOK_DIR", str(tmp_path / "notebook"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  probe = nbformat.v4.new_code_cell(
      "import sys, tigerfg_jax\nprint('KERNEL', sys.executable)\n"
      "print('PACKAGE', tigerfg_jax.__file__)")
  nb.cells.append(probe)

  NotebookClient(nb, timeout=600, kernel_name=KERNEL,
                 resources={"metadata": {"path": REPO}}).execute()

  cells = {cell.id: cell for cell in nb.cells if cell.cell_type == "code"}
  for cell in cells.values():
    assert not [o for o in cell.outputs if o.output_type == "error"], cell.id
  probe_text = "\n".join(_texts(probe))
  assert f"KERNEL {sys.executable}\n" in probe_text
  # Importable from the repository root: the install cell ran nothing.
  assert f"PACKAGE {os.path.join(REPO, 'tigerfg_jax', '__init__.py')}\n" in probe_text
  assert cells["install"].outputs == []

  table = "\n".join(_texts(cells["results"]))
  assert "R@1" in table and "mAP@10" in table
  rows = [line for line in table.splitlines() if line.startswith("| eval_")]
  assert {row.split("|")[1].strip() for row in rows} >= {"eval_cluttered", "eval_normal"}

  pngs = [o for o in cells["attention"].outputs
          if o.output_type == "display_data" and "image/png" in o.data]
  assert len(pngs) == 1
  picture = tmp_path / "notebook" / "attention.png"
  assert picture.read_bytes().startswith(b"\x89PNG")

  search_text = "\n".join(_texts(cells["search"]))
  hits = re.findall(r"^(\d+) (eval_cluttered\S+) (-?\d+\.\d{6}) (.+)$", search_text, re.M)
  assert [int(rank) for rank, *_ in hits] == [1, 2, 3, 4, 5]
  scores = [float(score) for _, _, score, _ in hits]
  assert scores == sorted(scores, reverse=True)
  catalog = {}
  with open(tmp_path / "notebook" / "runs" / "distill" / "data" / "eval_cluttered" /
            "items.jsonl", encoding="utf-8") as f:
    for line in f:
      item = json.loads(line)
      catalog[item["item_id"]] = item["title"]
  assert len({item_id for _, item_id, _, _ in hits}) == 5
  for _, item_id, _, title in hits:
    assert catalog[item_id] == title
