r"""Memory-plan sweep: the recipes' per-chip memory on TPU slices, compiled without a TPU (issue 24, "Measured").

    python bench/plan.py --out bench_out/plan                     # the whole sweep (hours on a small machine)
    python bench/plan.py --out bench_out/plan --recipes coco --topologies v5e:2x4 --per_chip 8 \
        --dtypes bfloat16 --remat True                            # one point
    python bench/plan.py --out bench_out/plan --table             # the table of what is there, nothing compiled

Each point is one `python -m panoptic_jax.plan --mode=train ... --json=OUT/<point>.json` in its own process (a
compile of the COCO R50 step holds several GB; one process per point returns them), run one after the other; a point
whose JSON exists is not compiled again, so an interrupted sweep resumes. The grid is recipes x topologies x images
per chip x dtype x remat; the table has a row per point, grouped by topology: per-chip memory (arguments +
temporaries = total against HBM), TFLOP per chip-step, the roofline step time, the verdict and the compile time.
Needs libtpu (`pip install -r requirements-tpu.txt`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# Recipe name -> (config file, overrides).
RECIPES = {
    "coco": ("configs/coco.py", []),
    "coco_convnext_l": ("configs/coco.py", ["--config.model.preset=kmax_convnext_l_coco"]),
    "cityscapes": ("configs/cityscapes.py", []),
}


def point_name(recipe: str, topology: str, per_chip: int, dtype: str, remat: bool) -> str:
  return f"{recipe}_{topology.replace(':', '-')}_{per_chip}pc_{dtype}_{'remat' if remat else 'noremat'}"


def run_point(out: pathlib.Path, recipe: str, topology: str, per_chip: int, dtype: str, remat: bool,
              timeout_s: float) -> dict | None:
  """Compiles one point (unless its JSON exists) and returns its report, or None when the plan failed."""
  path = out / f"{point_name(recipe, topology, per_chip, dtype, remat)}.json"
  if not path.exists():
    config, overrides = RECIPES[recipe]
    command = [sys.executable, "-m", "panoptic_jax.plan", f"--config={REPO / config}", f"--topology={topology}",
               f"--per_chip={per_chip}", "--mode=train", f"--config.model.dtype={dtype}",
               f"--config.model.remat={remat}", f"--json={path}", *overrides]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    print(f"{path.stem}: exit {result.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    if result.returncode:
      print(result.stderr[-2000:], file=sys.stderr)
      return None
  report = json.loads(path.read_text())
  report["point"] = {"recipe": recipe, "topology": topology, "per_chip": per_chip, "dtype": dtype, "remat": remat}
  return report


def table(reports: list[dict]) -> str:
  """Markdown, one table per topology."""
  columns = ["recipe", "images/chip", "dtype", "remat", "arguments GiB", "temporaries GiB", "total GiB / usable HBM",
             "headroom GiB", "TFLOP/chip-step", "roofline ms/step", "verdict", "compile s"]
  out = []
  for topology in sorted({r["point"]["topology"] for r in reports}):
    rows = [r for r in reports if r["point"]["topology"] == topology]
    out += [f"### {rows[0]['target']}", "", "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns)]
    for r in sorted(rows, key=lambda r: (r["point"]["recipe"], r["point"]["per_chip"], r["point"]["dtype"],
                                         r["point"]["remat"])):
      p, s = r["point"], r["steps"][0]
      out.append("| " + " | ".join(str(v) for v in [
          p["recipe"], p["per_chip"], p["dtype"], p["remat"], f"{s['arguments_gib']:.2f}",
          f"{s['temporaries_gib']:.2f}", f"{s['total_gib']:.2f} / {s['hbm_gib']:.2f}", f"{s['headroom_gib']:+.2f}",
          f"{s['tflop']:.2f}", f"{s['roofline_s'] * 1e3:.0f}", s["verdict"], f"{s['compile_s']:.0f}"]) + " |")
    out.append("")
  return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, required=True, help="Folder of the points' JSON reports.")
  parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
  parser.add_argument("--topologies", nargs="+", default=["v4:2x2x1", "v5e:2x4", "v5p:2x2x1", "v6e:2x4"])
  parser.add_argument("--per_chip", nargs="+", type=int, default=[1, 2, 4, 8, 16])
  parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
  parser.add_argument("--remat", nargs="+", default=["False", "True"], choices=["False", "True"])
  parser.add_argument("--timeout_s", type=float, default=3600.0, help="Per point.")
  parser.add_argument("--table", action="store_true", help="Only print the table of the points already there.")
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  reports = []
  if args.table:
    for path in sorted(args.out.glob("*.json")):
      report = json.loads(path.read_text())
      c = report["config_summary"]
      recipe = next((name for name, (_, overrides) in RECIPES.items() if not overrides and name in c["preset"]),
                    "coco_convnext_l" if "convnext_l" in c["preset"] else c["preset"])
      topology = report["target"].split(" ")[0]
      report["point"] = {"recipe": recipe, "topology": topology, "dtype": c["dtype"], "remat": c["remat"],
                         "per_chip": c["train_batch"] // report["num_chips"]}
      reports.append(report)
  else:
    for recipe, topology, per_chip, dtype, remat in itertools.product(args.recipes, args.topologies, args.per_chip,
                                                                      args.dtypes, args.remat):
      report = run_point(args.out, recipe, topology, per_chip, dtype, remat == "True", args.timeout_s)
      if report is not None:
        reports.append(report)
  print(table(reports))
  return 0


if __name__ == "__main__":
  sys.exit(main())
