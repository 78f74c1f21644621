"""Helpers shared by the benchmarks: run header, matmul reference rate, compiled-program statistics, tables.

Imported by bench/model.py and bench/train.py (`from bench import common`); no benchmark logic of its own.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Nominal dense bf16 peak per chip (TFLOP/s) from the vendors' data sheets; matched against device_kind.
NOMINAL_BF16_TFLOPS = (
    ("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0), ("V100", 125.0),
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5", 197.0), ("TPU v4", 275.0),
)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def host_memory_gb() -> float:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def load_average() -> float:
  """The 1-minute load average (what `uptime` shows first)."""
  return os.getloadavg()[0]


def peak_rss_gb() -> float:
  """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def device_description() -> str:
  device = jax.devices()[0]
  return f"{jax.default_backend()} ({device.device_kind}) x{jax.device_count()}"


def nominal_peak_tflops() -> float | None:
  """The chip's nominal dense bf16 TFLOP/s, or None on CPU / an unknown accelerator."""
  if jax.default_backend() == "cpu":
    return None
  kind = jax.devices()[0].device_kind
  return next((peak for name, peak in NOMINAL_BF16_TFLOPS if name.lower() in kind.lower()), None)


def header(title: str) -> str:
  """Markdown heading plus the machine, date, command and load lines every table carries."""
  command = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable), *sys.argv])
  return "\n".join([
      f"### {title}",
      f"- machine: {cpu_model()}, {os.cpu_count()} cores, {host_memory_gb():.0f} GB RAM; "
      f"jax {jax.__version__}, device {device_description()}",
      f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
      f"- command: `{command}`",
      f"- load average (1 min) at the start of this part: {load_average():.2f}",
      "",
  ])


_matmul = jax.jit(lambda a, b: a @ b)


def matmul_rate(n: int = 2048, reps: int = 10, rounds: int = 3) -> float:
  """Best achieved float32 GFLOP/s of an n x n matmul on the default device (the practical peak)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  _matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(reps):
      out = _matmul(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n**3 / best / 1e9


def spot_matmul_rate() -> float:
  """`matmul_rate` of one short round (~0.25 s on 2 CPU cores), for timing beside each call of a benchmark."""
  return matmul_rate(reps=3, rounds=1)


def median_and_range(values: Sequence[float]) -> str:
  """'median (min-max)', rounded to integers: a table cell for the matmul rates beside a benchmark's calls."""
  return f"{np.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def seconds_at_rate(times: Sequence[float], rates: Sequence[float], reference_rate: float) -> float:
  """Median of seconds scaled to a machine whose matmul rate is `reference_rate`: each time times the matmul rate
  measured right after it, over `reference_rate`. On a shared machine the speed varies by up to 30% within minutes;
  a comparison with a figure measured elsewhere (the PyTorch port's, beside its own matmul rate) holds at equal
  matmul rates."""
  return float(np.median([t * r / reference_rate for t, r in zip(times, rates)]))


def compiled_gflop(compiled: Any) -> float:
  """FLOPs of one call of a compiled executable from XLA's cost analysis, in GFLOP (nan if unavailable)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan"))) / 1e9


def compiled_memory_gb(compiled: Any) -> dict[str, float]:
  """Per-device buffer sizes of a compiled executable (GB = 2^30 bytes).

  `peak` = arguments + outputs - aliased (donated buffers reused for outputs) + temporaries: what the device must hold
  while the program runs.
  """
  mem = compiled.memory_analysis()
  gb = lambda v: v / 2**30
  out = {"arguments": gb(mem.argument_size_in_bytes), "outputs": gb(mem.output_size_in_bytes),
         "aliased": gb(mem.alias_size_in_bytes), "temp": gb(mem.temp_size_in_bytes)}
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temp"]
  return out


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A markdown table; floats are printed as given (format them before)."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)
