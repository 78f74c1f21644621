"""A run's workdir: its layout, its own configuration (`config.json`), and the lock that keeps two runs apart.

    WORKDIR/
      config.json        the resolved config, the datasets and the training set's categories (written at start)
      checkpoints/<step> Orbax checkpoints
      metrics.jsonl      one JSON row per logged step and evaluation
      events.out.tfevents.*  TensorBoard
      visualizations/    image | ground truth | prediction pictures of the evaluations
      lock               held by the run that trains in this workdir

Coming back to a workdir (to resume, evaluate or predict) uses `config.json`: the run's own configuration. A config
given again must agree with it except in the fields of `SAFE_OVERRIDES`, which change how a run is carried out or
evaluated but not what is trained.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
from typing import Any, Iterator

import ml_collections

from panoptic_jax.errors import UserError

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
VISUALIZATIONS = "visualizations"
LOCK = "lock"

# Fields a resumed or evaluated run may change: how it runs, logs, checkpoints and evaluates, and on which devices.
# `train.steps` is among them (a run may be extended): the learning-rate schedule then changes from that step on.
# `model.init_from*` only act when a run starts without a checkpoint, so a resumed run may name the file elsewhere.
SAFE_OVERRIDES = ("eval.", "mesh.", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.eval_every", "train.steps", "input.num_workers", "dataset.val", "dataset.endpoint_url",
                  "dataset.storage_retry_s", "dataset.synthetic.cache_dir", "model.init_from",
                  "model.init_from_exclude")


class WorkdirError(UserError, RuntimeError):
  """The workdir is in use, or holds a run that the request does not fit; the message says what to do."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def _is_safe(field: str) -> bool:
  return any(field == safe or (safe.endswith(".") and field.startswith(safe)) for safe in SAFE_OVERRIDES)


class Workdir:
  """Paths and records of one run's folder (local for now)."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(path).expanduser()

  def __str__(self) -> str:
    return str(self.path)

  @property
  def checkpoints(self) -> pathlib.Path:
    return self.path / CHECKPOINTS

  @property
  def metrics(self) -> pathlib.Path:
    return self.path / METRICS

  @property
  def visualizations(self) -> pathlib.Path:
    return self.path / VISUALIZATIONS

  def checkpoint_steps(self) -> list[int]:
    """The steps of the finished checkpoints (Orbax renames a step's folder to its number once it is complete)."""
    if not self.checkpoints.is_dir():
      return []
    return sorted(int(p.name) for p in self.checkpoints.iterdir() if p.name.isdigit() and p.is_dir())

  def read_run(self) -> dict[str, Any] | None:
    """The run record of `config.json` (`config`, `train_location`, `val_location`, `categories`, `is_thing`,
    `colors`, `label_divisor`; runs of earlier versions lack the last two), or
    None when the workdir has none."""
    path = self.path / CONFIG
    if not path.exists():
      return None
    try:
      record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise WorkdirError(f"{path}: cannot read the run's configuration ({e}); restore it or use a new --workdir") from e
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise WorkdirError(f"{path}: expected a JSON object with a 'config' mapping, found {str(record)[:200]}")
    return record

  def write_run(self, config: ml_collections.ConfigDict, **facts: Any) -> None:
    """Writes `config.json`: the config and `facts` (datasets, categories). Atomically: a reader never sees half."""
    self.path.mkdir(parents=True, exist_ok=True)
    record = {"config": config.to_dict(), **facts}
    temporary = self.path / f".{CONFIG}.{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=2, default=str) + "\n")
    temporary.replace(self.path / CONFIG)

  def check_config(self, config: ml_collections.ConfigDict) -> list[str]:
    """Compares `config` with the run's own: raises WorkdirError naming the fields that differ outside
    SAFE_OVERRIDES; returns the safe fields that differ (for the log)."""
    # Imported here: `panoptic_jax.main` imports this module before it re-executes itself, and should stay light.
    from panoptic_jax.training import config as config_lib

    record = self.read_run()
    if record is None:
      return []
    # The recorded config rebuilt on this version's base: fields added since take their defaults.
    recorded = config_lib.from_record(record, str(self.path / CONFIG))
    saved, given = (_flatten(json.loads(json.dumps(c.to_dict(), default=str))) for c in (recorded, config))
    differing = sorted(f for f in saved.keys() | given.keys() if saved.get(f) != given.get(f))
    unsafe = [f for f in differing if not _is_safe(f)]
    if unsafe:
      shown = "; ".join(f"{f}: {saved.get(f)!r} in the run, {given.get(f)!r} now" for f in unsafe[:8])
      more = f" (and {len(unsafe) - 8} more)" if len(unsafe) > 8 else ""
      raise WorkdirError(
          f"{self.path} holds a run trained with another configuration: {shown}{more}. Leave out --config to use "
          f"the run's own ({self.path / CONFIG}; overrides of {', '.join(SAFE_OVERRIDES)} are allowed), or pass "
          "another --workdir to start a new run.")
    return [f"{f}: {saved.get(f)!r} -> {given.get(f)!r}" for f in differing]

  @contextlib.contextmanager
  def lock(self) -> Iterator[None]:
    """Holds the workdir's lock for the duration: a second run started on this workdir stops with WorkdirError
    instead of interleaving checkpoints. The operating system releases the lock when the holding process ends,
    killed or not, so a crashed run's successor is never locked out."""
    self.path.mkdir(parents=True, exist_ok=True)
    path = self.path / LOCK
    handle = open(path, "a+")
    try:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise WorkdirError(f"{self.path} is in use by another run ({holder}); wait for it to finish or stop it, or "
                           "pass another --workdir") from None
      handle.seek(0)
      handle.truncate()
      handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                   f"{datetime.datetime.now().isoformat(timespec='seconds')}\n")
      handle.flush()
      yield
    finally:
      handle.close()  # Releases the lock.
