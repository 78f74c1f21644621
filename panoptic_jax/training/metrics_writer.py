"""Where metrics go: TensorBoard event files, a JSON-lines file and a console progress line (process 0 only)."""

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping

import jax
from absl import logging
from tensorboardX import SummaryWriter

from panoptic_jax.data import storage as storage_lib

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


class MetricsWriter:
  """Writes scalars to `WORKDIR/metrics.jsonl` and TensorBoard (`WORKDIR/tensorboard/`); other processes write nothing.

  Object stores cannot append, so metrics.jsonl is written whole at every write (it grows by one short row per
  logged step), and the TensorBoard events of a bucket workdir are written to a local folder and uploaded whole at
  every write.

  Args:
    workdir: the run's location.
    after_step: a resumed run's first step: rows of later steps (written after its checkpoint by the interrupted run,
      and about to be written again) are dropped, so that metrics.jsonl keeps one row per step. None for an
      evaluation, which adds its rows to the file as it finds it at each write.
  """

  def __init__(self, workdir: storage_lib.Storage, after_step: int | None = None):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    self._storage = workdir
    rows = workdir.read_bytes(METRICS).decode().splitlines(keepends=True) if workdir.exists(METRICS) else []
    if after_step is not None:
      rows = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= after_step]
    self._rows = rows
    # An evaluation beside a training run writes the same file: it appends to what is there now.
    self._reread = after_step is None
    self._events = storage_lib.open_storage(workdir.url(TENSORBOARD))
    self._staging = None if isinstance(workdir, storage_lib.LocalStorage) else tempfile.mkdtemp(prefix="tensorboard-")
    self._tensorboard = SummaryWriter(self._staging or workdir.url(TENSORBOARD))

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self._active:
      return
    scalars = {f"{prefix}{k}": float(v) for k, v in scalars.items()}
    if self._reread:
      self._rows = self._storage.read_bytes(METRICS).decode().splitlines(keepends=True) if self._storage.exists(
          METRICS) else []
    self._rows.append(json.dumps({"step": step, **scalars}) + "\n")
    self._storage.write_bytes(METRICS, "".join(self._rows).encode())
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._tensorboard.flush()
    if self._staging is not None:
      for name in sorted(os.listdir(self._staging)):
        with open(os.path.join(self._staging, name), "rb") as f:
          self._events.write_bytes(name, f.read())

  def close(self) -> None:
    if self._active:
      self._tensorboard.close()
      if self._staging is not None:
        shutil.rmtree(self._staging, ignore_errors=True)


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
