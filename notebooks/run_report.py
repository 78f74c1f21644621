"""Executes the report: notebooks/report.py (jupytext percent format, the reviewed source) -> report.ipynb ->
an executed notebook and report.html in an output folder.

  .venv/bin/python notebooks/run_report.py [OUT]      # OUT defaults to notebooks/out/ (git-ignored)

Steps: report.ipynb is regenerated from report.py when their cells differ (it is committed without outputs); a
kernel spec for this Python (the virtual environment's) is written into OUT, so nothing outside OUT and the
repository is touched; the notebook is executed with nbclient in the repository root, with REPORT_OUT=OUT (where
its runs, predictions and metrics go); OUT/report.ipynb (with outputs) and OUT/report.html (nbconvert, pictures
embedded) are written. The exit status is 1 when a cell fails (the executed notebook and HTML are still written,
showing the error) and 0 otherwise. The runs of an earlier execution in OUT/runs are removed first, unless
--keep_runs is given (the notebook then reuses finished runs). REPORT_WORKDIR=RUN uses an existing training run
instead of training (see the notebook).
"""

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbconvert import HTMLExporter

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE = HERE / "report.py"
NOTEBOOK = HERE / "report.ipynb"
KERNEL = "panoptic_jax_report"


def sync_notebook() -> nbformat.NotebookNode:
  """report.ipynb from report.py, rewritten only when the cells differ; returns the notebook."""
  notebook = jupytext.read(SOURCE)
  if NOTEBOOK.exists():
    current = jupytext.read(NOTEBOOK)
    same = [(c.cell_type, c.source) for c in current.cells] == [(c.cell_type, c.source) for c in notebook.cells]
    if same:
      return notebook
  jupytext.write(notebook, NOTEBOOK)
  print(f"regenerated {NOTEBOOK.relative_to(ROOT)} from {SOURCE.relative_to(ROOT)}")
  return notebook


def write_kernel_spec(out: pathlib.Path) -> pathlib.Path:
  """A kernel spec running this interpreter's ipykernel, under out/jupyter (put on JUPYTER_PATH)."""
  folder = out / "jupyter" / "kernels" / KERNEL
  folder.mkdir(parents=True, exist_ok=True)
  spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
          "display_name": "Python 3 (panoptic_jax)", "language": "python"}
  (folder / "kernel.json").write_text(json.dumps(spec, indent=1))
  return out / "jupyter"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("out", nargs="?", default=str(HERE / "out"), help="output folder (default notebooks/out)")
  parser.add_argument("--keep_runs", action="store_true", help="reuse the finished runs of an earlier execution")
  parser.add_argument("--timeout", type=int, default=1200, help="seconds one cell may take (default 1200)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out).resolve()
  out.mkdir(parents=True, exist_ok=True)
  if not args.keep_runs:
    for stale in (out / "runs", out / "predictions"):
      shutil.rmtree(stale, ignore_errors=True)

  notebook = sync_notebook()
  os.environ["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(write_kernel_spec(out)),
                                                              os.environ.get("JUPYTER_PATH")]))
  os.environ["REPORT_OUT"] = str(out)
  client = NotebookClient(notebook, timeout=args.timeout, kernel_name=KERNEL,
                          resources={"metadata": {"path": str(ROOT)}})
  start = time.time()
  failed = None
  try:
    client.execute()
  except CellExecutionError as e:
    failed = e
  elapsed = time.time() - start
  notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
  nbformat.write(notebook, out / "report.ipynb")
  html, _ = HTMLExporter().from_notebook_node(notebook)
  (out / "report.html").write_text(html, encoding="utf-8")
  print(f"executed in {elapsed:.0f} s -> {out / 'report.ipynb'}, {out / 'report.html'}")
  if failed is not None:
    print(f"a cell failed:\n{failed}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
