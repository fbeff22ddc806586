"""Executes the notebooks in ``notebooks/``, each in a fresh kernel, and saves their outputs.

    python scripts/regenerate_notebooks.py          # all notebooks, full settings
    python scripts/regenerate_notebooks.py --build  # rewrite them from build_notebooks.py first
    python scripts/regenerate_notebooks.py notebooks/03_linear_classifier_optax.ipynb
    python scripts/regenerate_notebooks.py --check  # execute without saving (fails on error)

The kernel runs the Python that runs this script (``sys.executable``), whatever
kernelspecs are installed, so a virtual environment's notebooks use that
environment. ``--fast`` sets ``JSOFTMAX_NOTEBOOK_FAST=1``, which the notebooks
read to shrink their training runs; saved outputs should come from a full run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
FAST_ENV = "JSOFTMAX_NOTEBOOK_FAST"
KERNEL_NAME = "jsoftmax-notebooks"


def notebook_paths() -> list[Path]:
    """The notebooks, in reading order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@contextmanager
def this_python_kernel() -> Iterator[KernelSpecManager]:
    """A kernelspec manager whose only kernel runs ``sys.executable -m ipykernel_launcher``.

    Independent of any kernelspec installed for the user or the system, so a
    fresh virtual environment with ipykernel is enough.
    """
    with tempfile.TemporaryDirectory() as directory:
        spec_dir = Path(directory) / KERNEL_NAME
        spec_dir.mkdir()
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        yield KernelSpecManager(kernel_dirs=[directory], ensure_native_kernel=False)


def execute(
    notebook: nbformat.NotebookNode,
    *,
    cwd: Path = NOTEBOOK_DIR,
    fast: bool = False,
    timeout: int = 600,
) -> nbformat.NotebookNode:
    """Runs ``notebook`` top to bottom in a fresh kernel, in place; raises on the first error."""
    env = dict(os.environ)
    if fast:
        env[FAST_ENV] = "1"
    else:
        env.pop(FAST_ENV, None)
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # plots into the outputs
    with this_python_kernel() as spec_manager:
        manager = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=spec_manager)
        client = NotebookClient(
            notebook,
            km=manager,
            timeout=timeout,
            record_timing=False,  # no timestamps in the saved notebooks
            coalesce_streams=True,  # one stdout block per cell, however it was flushed
            resources={"metadata": {"path": str(cwd)}},
        )
        client.execute(env=env)  # keyword arguments go to KernelManager.start_kernel
    return notebook


def scrub(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drops per-run metadata that would make every regeneration a diff."""
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
    notebook.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    notebook.metadata.get("language_info", {}).pop("version", None)
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="notebook files (default: all)")
    parser.add_argument("--fast", action="store_true", help=f"set {FAST_ENV}=1")
    parser.add_argument("--check", action="store_true", help="execute, but do not save")
    parser.add_argument(
        "--build", action="store_true", help="run the cells of build_notebooks.py, not the files'"
    )
    args = parser.parse_args(argv)
    build_notebooks = None
    if args.build:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import build_notebooks
    if args.notebooks:
        paths = [Path(p) if Path(p).exists() else NOTEBOOK_DIR / p for p in args.notebooks]
    elif build_notebooks is not None:
        paths = [NOTEBOOK_DIR / name for name in build_notebooks.NOTEBOOKS]
    else:
        paths = notebook_paths()
    for path in paths:
        if build_notebooks is not None:
            notebook = build_notebooks.build(path.name)
        else:
            notebook = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        execute(notebook, cwd=path.parent, fast=args.fast)
        seconds = time.perf_counter() - start
        if not args.check:
            nbformat.write(scrub(notebook), path)
        saved = "" if args.check else f", saved ({path.stat().st_size / 1024:.0f} KiB)"
        print(f"{path.name}: executed in {seconds:.1f} s{saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
