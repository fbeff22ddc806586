"""The teaching notebooks: each runs top to bottom in a fresh kernel, and is saved well.

Execution uses small settings (``JSOFTMAX_NOTEBOOK_FAST=1``) so that the
training notebook finishes quickly; any error in any cell fails the test.
The saved notebooks are checked without running anything: valid nbformat, the
Colab install cell first, outputs saved from one clean run, in sync with
``scripts/build_notebooks.py``, and modest in size.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = [
    "01_softmax_stability.ipynb",
    "02_cross_entropy_gradient.ipynb",
    "03_linear_classifier_optax.ipynb",
]
MAX_TOTAL_BYTES = 3 * 1024 * 1024


def load_script(name: str) -> ModuleType:
    """Imports ``scripts/<name>.py`` (the scripts directory is not a package)."""
    path = ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_jsoftmax_scripts_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def read(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_all_there() -> None:
    found = sorted(path.name for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    assert found == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_valid_nbformat(name: str) -> None:
    notebook = read(name)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", EXPECTED)
def test_first_code_cell_installs_jsoftmax_only_when_missing(name: str) -> None:
    first = code_cells(read(name))[0]
    assert "install" in first.metadata.get("tags", [])
    source = first.source
    assert "import jsoftmax" in source
    assert "except ImportError:" in source
    assert "%pip install" in source
    # Locally jsoftmax imports, so the cell ran and printed nothing.
    assert first.outputs == []


@pytest.mark.parametrize("name", EXPECTED)
def test_saved_outputs_come_from_one_clean_run(name: str) -> None:
    cells = code_cells(read(name))
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), "run every cell once, top to bottom"
    outputs = [output for cell in cells for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any(output.output_type == "stream" for output in outputs)
    assert any("image/png" in output.get("data", {}) for output in outputs), "no saved plot"
    for output in outputs:
        if output.output_type == "stream":
            assert output.name == "stdout", f"unexpected stderr output: {output.text[:500]}"
            for fragment in ("site-packages", "/home/", "/root/", "ipykernel_"):
                assert fragment not in output.text, f"a local path in the outputs: {fragment}"


@pytest.mark.parametrize("name", EXPECTED)
def test_saved_notebooks_match_the_generator(name: str) -> None:
    build = load_script("build_notebooks")
    expected = build.build(name)
    saved = read(name)
    assert [(cell.cell_type, cell.source) for cell in saved.cells] == [
        (cell.cell_type, cell.source) for cell in expected.cells
    ], "run scripts/build_notebooks.py, then scripts/regenerate_notebooks.py"


def test_saved_notebooks_are_modest_in_size() -> None:
    total = sum((NOTEBOOK_DIR / name).stat().st_size for name in EXPECTED)
    assert total < MAX_TOTAL_BYTES, f"{total / 1024:.0f} KiB of notebooks"


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_executes_in_a_fresh_kernel(name: str) -> None:
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    regenerate = load_script("regenerate_notebooks")
    notebook = copy.deepcopy(read(name))
    for cell in code_cells(notebook):
        cell.outputs = []
        cell.execution_count = None
    # Raises nbclient's CellExecutionError, with the cell and traceback, on any error.
    regenerate.execute(notebook, cwd=NOTEBOOK_DIR, fast=True)
    cells = code_cells(notebook)
    assert all(cell.execution_count is not None for cell in cells)
    errors = [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    assert not errors
