"""Micro-benchmark: the batched Hungarian solver of the train step (jit + vmap) against scipy on the host and against
`optax.assignment.hungarian_algorithm` (the same jit + vmap), in the same run.

  python bench/matching.py [--batch 64] [--sizes 128,256] [--repeats 5]

For each size, draws `batch` random cost matrices of the kMaX kind (-(dice x class prob) for a random number of
ground-truth rows, void rows padded with -999) and of the uniform kind, solves them with scipy one by one on the
host and with both jitted, vmapped JAX solvers on the default device, checks that the total costs agree with scipy's
(|diff| <= 1e-5 x max(1, |total|)) and prints a markdown table (median wall time of `repeats` runs after one warm-up;
compile time listed apart). It times the solvers alone, not the train step around them.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import jax
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment as scipy_lsa

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from panoptic_jax.training.matching import linear_sum_assignment  # noqa: E402


def _costs(rng: np.random.Generator, batch: int, n: int, kind: str) -> np.ndarray:
  if kind == "uniform":
    return rng.random((batch, n, n)).astype(np.float32)
  cost = -rng.random((batch, n, n)) * rng.random((batch, n, n))
  for b in range(batch):
    cost[b, rng.integers(1, n + 1):] = -999.0
  return cost.astype(np.float32)


def _time_jax(solve, costs: jax.Array, repeats: int) -> tuple[float, list[float], tuple[np.ndarray, np.ndarray]]:
  """(compile + first call s, call times s, (rows, cols)) of a jitted batched solver."""
  t0 = time.perf_counter()
  jax.block_until_ready(solve(costs))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    rows, cols = jax.block_until_ready(solve(costs))
    times.append(time.perf_counter() - t0)
  return compile_s, times, (np.asarray(rows), np.asarray(cols))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--sizes", default="128,256")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  solvers = {"ours": jax.jit(jax.vmap(linear_sum_assignment)),
             "optax": jax.jit(jax.vmap(optax.assignment.hungarian_algorithm))}
  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, optax {optax.__version__}, "
        f"batch {args.batch}")
  print()
  print("| size | kind | scipy loop (ms) | ours jit+vmap (ms) | optax jit+vmap (ms) | ours compile (s) | "
        "optax compile (s) | max abs diff of totals (ours / optax) | equal |")
  print("|---|---|---|---|---|---|---|---|---|")
  all_ok = True
  for n in (int(s) for s in args.sizes.split(",")):
    for kind in ("kmax", "uniform"):
      costs = _costs(rng, args.batch, n, kind)
      costs64 = costs.astype(np.float64)

      scipy_times, ref = [], None
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        ref = [scipy_lsa(c) for c in costs64]
        scipy_times.append(time.perf_counter() - t0)
      ref_totals = np.array([c[r, k].sum() for c, (r, k) in zip(costs64, ref)])

      device_costs = jax.device_put(costs)
      cells, diffs, ok = {}, [], True
      for name, solve in solvers.items():
        compile_s, times, (rows, cols) = _time_jax(solve, device_costs, args.repeats)
        totals = np.array([c[r, k].sum() for c, r, k in zip(costs64, rows, cols)])
        diff = np.abs(totals - ref_totals)
        ok &= bool(np.all(diff <= 1e-5 * np.maximum(1.0, np.abs(ref_totals))))
        cells[name] = (1e3 * np.median(times), compile_s)
        diffs.append(f"{diff.max():.2e}")
      all_ok &= ok
      print(f"| {n}x{n} | {kind} | {1e3 * np.median(scipy_times):.1f} | {cells['ours'][0]:.1f} | "
            f"{cells['optax'][0]:.1f} | {cells['ours'][1]:.2f} | {cells['optax'][1]:.2f} | {' / '.join(diffs)} | "
            f"{'yes' if ok else 'NO'} |")
  if not all_ok:
    raise SystemExit("a JAX solver's total costs differ from scipy's")


if __name__ == "__main__":
  main()
