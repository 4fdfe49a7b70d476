#!/usr/bin/env python
"""Execute chapter notebooks in place, storing fresh outputs (what CI's nbval then compares against).

    python scripts/run_notebook.py book/02_maml.ipynb [more.ipynb ...]   # refresh these chapters
    python scripts/run_notebook.py --all                                  # every notebook in _toc.yml
    python scripts/run_notebook.py --list                                 # print the notebooks in _toc.yml
    python scripts/run_notebook.py --timeout 1200 book/05_omniglot.ipynb  # seconds per cell

Run it with the book's environment (``.venv/bin/python``, or ``make run-notebook NB=...``). The
kernel is the Python running this script, whatever kernelspecs are installed; its working directory
is the notebook's folder (as under nbval), PYTHONHASHSEED is fixed, and the CPU kernels are the
portable ones that CI checks with (``mlcore.notebook.PORTABLE_CPU_ENV``). No timing metadata is
written, so re-running an unchanged notebook leaves ``git diff`` empty apart from real changes.

A cell that raises stops the run, prints the traceback and leaves the notebook file untouched
(exit status 1): stored outputs never contain errors. To show an error on purpose, catch it in the
cell and print it.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import ipykernel.kernelspec
import nbformat
import yaml
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from mlcore.notebook import PORTABLE_CPU_ENV

ROOT = Path(__file__).resolve().parents[1]

# matplotlib's to_jshtml() names its player after a fresh uuid4 (32 hex digits) on every run.
_ANIM_ID = re.compile(r"_anim_img([0-9a-f]{32})")


def toc_files(root: Path = ROOT) -> list[Path]:
    """Every file named in ``_toc.yml`` (root first, in reading order), with its suffix resolved."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    entries: list[str] = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                entries.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key, []))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    files = []
    for entry in entries:
        path = root / entry
        matches = [path] if path.suffix in (".md", ".ipynb") else [
            path.with_suffix(s) for s in (".ipynb", ".md") if path.with_suffix(s).exists()]
        files.append(matches[0] if matches else path)  # a missing file is reported by the tests
    return files


def toc_notebooks(root: Path = ROOT) -> list[Path]:
    return [p for p in toc_files(root) if p.suffix == ".ipynb"]


class _CurrentEnvKernelSpecs(KernelSpecManager):
    """Every kernel name resolves to ipykernel in *this* interpreter (like nbval --nbval-current-env)."""

    def get_kernel_spec(self, kernel_name: str):  # noqa: ARG002 - one kernel for every name
        return self.kernel_spec_class(resource_dir=ipykernel.kernelspec.RESOURCES,
                                      **ipykernel.kernelspec.get_kernel_dict())


def run(path: Path, timeout: int) -> float:
    """Execute ``path`` top to bottom and write it back; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_spec_manager=_CurrentEnvKernelSpecs(), kernel_name="python3")
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False, record_timing=False,
                            resources={"metadata": {"path": str(path.parent)}})
    env = {**os.environ, "PYTHONHASHSEED": "0", **PORTABLE_CPU_ENV}
    start = time.perf_counter()
    client.execute(env=env)
    seconds = time.perf_counter() - start
    for index, cell in enumerate(nb.cells):
        cell.metadata.pop("execution", None)  # timing left by an editor would make every re-run a diff
        if cell.cell_type == "code":
            _stable_animation_ids(cell, f"{path.name}:{index}")
            cell.outputs = _merged_streams(cell.outputs)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def _merged_streams(outputs: list) -> list:
    """Consecutive stdout (stderr) chunks as one output, as nbval compares them.

    How a kernel splits a cell's prints into messages depends on the machine's load; merged, an
    unchanged notebook stores the same outputs however busy the machine was.
    """
    merged: list = []
    for output in outputs:
        if output.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream" \
                and merged[-1].get("name") == output.get("name"):
            previous = merged[-1]
            previous["text"] = "".join(previous["text"]) + "".join(output["text"])
            continue
        merged.append(output)
    return merged


def _stable_animation_ids(cell, key: str) -> None:
    """Replace to_jshtml()'s random player ids by ids derived from the cell's position.

    The player's id appears many times in its HTML and JavaScript; each distinct id becomes
    sha1(notebook name, cell index, ordinal), so two players on one page stay distinct and an
    unchanged notebook re-executes to identical bytes. (nbval masks these ids anyway, see
    nbval_sanitize.cfg; this only keeps `git diff` quiet.)
    """
    for output in cell.get("outputs", []):
        html = output.get("data", {}).get("text/html")
        if not html:
            continue
        text = html if isinstance(html, str) else "".join(html)
        ids = list(dict.fromkeys(_ANIM_ID.findall(text)))
        for ordinal, old in enumerate(ids):
            text = text.replace(old, hashlib.sha1(f"{key}:{ordinal}".encode()).hexdigest()[:32])
        if ids:
            output["data"]["text/html"] = text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to execute in place")
    parser.add_argument("--all", action="store_true", help="execute every notebook listed in _toc.yml")
    parser.add_argument("--list", action="store_true", help="print the notebooks listed in _toc.yml and exit")
    parser.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    args = parser.parse_args(argv)

    if args.list:
        print("\n".join(str(p.relative_to(ROOT)) for p in toc_notebooks()))
        return 0
    paths = list(args.notebooks) + (toc_notebooks() if args.all else [])
    if not paths:
        parser.error("name at least one notebook, or pass --all")
    for path in paths:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"{path} is not a notebook file (.ipynb)")

    failed = []
    for path in paths:
        print(f"executing {path} ...", flush=True)
        try:
            seconds = run(path, args.timeout)
        except (CellExecutionError, CellTimeoutError) as err:
            print(f"FAILED {path}: a cell raised; the file was not changed.\n{err}", file=sys.stderr)
            failed.append(path)
            continue
        print(f"wrote {path} ({seconds:.1f} s)", flush=True)
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(map(str, failed))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
