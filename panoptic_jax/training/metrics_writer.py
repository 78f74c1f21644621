"""Where metrics go: TensorBoard event files, a JSON-lines file and a console progress line (process 0 only)."""

import json
import math
import pathlib
import time
from collections.abc import Mapping

import jax
from absl import logging
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard; other processes write nothing.

  Args:
    workdir: the run's folder.
    after_step: a resumed run's first step: rows of later steps (written after its checkpoint by the interrupted run,
      and about to be written again) are dropped, so that metrics.jsonl keeps one row per step.
  """

  def __init__(self, workdir: str, after_step: int | None = None):
    self._active = jax.process_index() == 0
    if self._active:
      path = pathlib.Path(workdir) / "metrics.jsonl"
      if after_step is not None and path.exists():
        rows = path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if not row.strip() or json.loads(row).get("step", 0) <= after_step]
        if len(kept) != len(rows):
          temporary = path.with_name(path.name + ".tmp")
          temporary.write_text("".join(kept))
          temporary.replace(path)
      self._jsonl = open(path, "a")
      self._tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self._active:
      return
    scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._tensorboard.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tensorboard.close()


class Progress:
  """A one-line training progress report: step / total, loss terms, learning rate, images/s, ETA."""

  def __init__(self, total_steps: int, batch_size: int, first_step: int):
    self._total, self._batch = total_steps, batch_size
    self.restart(first_step)

  def restart(self, step: int) -> None:
    """Measures the rate from here: compilation and evaluation are not training speed."""
    self._last_step, self._last_time = step, time.monotonic()

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    now = time.monotonic()
    steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    eta_s = (self._total - step) / steps_per_s if steps_per_s > 0 else math.inf
    terms = " ".join(f"{k}={v:.4g}" for k, v in scalars.items() if k != "learning_rate")
    eta = f"{int(eta_s // 3600)}h{int(eta_s % 3600 // 60):02d}m{int(eta_s % 60):02d}s" if math.isfinite(eta_s) else "?"
    return (f"step {step}/{self._total} | {terms} | lr={scalars.get('learning_rate', float('nan')):.3g} | "
            f"{steps_per_s * self._batch:.2f} img/s | ETA {eta}")

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    logging.info("%s", self.line(step, scalars))
