"""A run's workdir: its layout, its own configuration (`config.json`), and the lease that keeps two runs apart.

    WORKDIR/
      config.json        the resolved config, the datasets and the training set's categories (written at start)
      checkpoints/<step> Orbax checkpoints
      metrics.jsonl      one JSON row per logged step and evaluation
      tensorboard/       TensorBoard event files
      visualizations/    image | ground truth | prediction pictures of the evaluations
      init_from.json     what `model.init_from` imported, when it did
      lock               the lease of the run that trains in this workdir

A workdir is a local folder or a bucket location, `s3://bucket/prefix` (any S3-compatible endpoint: the endpoint is
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, credentials the standard AWS chain) or `gs://bucket/prefix`. Everything
in it goes through one `panoptic_jax.data.storage.Storage`, except the checkpoints, which Orbax and tensorstore write
directly to the same location (panoptic_jax/training/orbax_s3.py).

Coming back to a workdir (to resume, evaluate or predict) uses `config.json`: the run's own configuration. A config
given again must agree with it except in the fields of `SAFE_OVERRIDES`, which change how a run is carried out or
evaluated but not what is trained.

The lease (`lock`): the training run writes who it is and until when its lease runs (`LEASE_S` from now) and renews
it every `RENEW_EVERY_S`; it removes the file when it ends. A run started while another's lease runs refuses with a
WorkdirError naming the holder. A lease that has expired, or whose holder was a process of this host that no longer
exists, is taken over: a crashed run's successor starts at once on the same host, or after at most `LEASE_S` on
another (a preempted VM's replacement). Object stores have no atomic create-if-absent that every S3-compatible server
honours, so taking a lease is write, wait `SETTLE_S`, read back: of two runs started within that moment, the one
whose write landed last holds it and the other refuses.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import ml_collections
from absl import logging

from panoptic_jax.data import storage as storage_lib
from panoptic_jax.errors import UserError

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
VISUALIZATIONS = "visualizations"
LOCK = "lock"
# Orbax's completion marker of a checkpoint in a bucket (orbax_s3.COMMIT_MARKER; not imported: this module stays
# light for main.py, which reads config.json before it re-executes itself).
_COMMIT_MARKER = "commit_success.txt"

# The lease (see the module docstring), in seconds.
LEASE_S = 90.0
RENEW_EVERY_S = 15.0
SETTLE_S = 1.0

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
  """The records of one run's location (a folder, `s3://` or `gs://`), through one Storage."""

  def __init__(self, location: str | os.PathLike[str]):
    self.storage = storage_lib.open_storage(location)

  def __str__(self) -> str:
    return self.storage.url()

  def url(self, relpath: str = "") -> str:
    """The full location of an entry: an absolute local path or a bucket URL (what Orbax and messages take)."""
    return self.storage.url(relpath)

  @property
  def in_bucket(self) -> bool:
    return not isinstance(self.storage, storage_lib.LocalStorage)

  @property
  def checkpoints(self) -> str:
    return self.url(CHECKPOINTS)

  def checkpoint_steps(self) -> list[int]:
    """The steps of the finished checkpoints: Orbax renames a local step's folder to its number once it is complete,
    and in a bucket marks it complete with a commit file."""
    steps = [name for name in self.storage.list_folders(CHECKPOINTS) if name.isdigit()]
    if self.in_bucket:
      steps = [name for name in steps if self.storage.exists(f"{CHECKPOINTS}/{name}/{_COMMIT_MARKER}")]
    return sorted(int(name) for name in steps)

  def read_run(self) -> dict[str, Any] | None:
    """The run record of `config.json` (`config`, `train_location`, `val_location`, `categories`, `is_thing`,
    `colors`, `label_divisor`; runs of earlier versions lack the last two), or
    None when the workdir has none."""
    if not self.storage.exists(CONFIG):
      return None
    where = self.url(CONFIG)
    try:
      record = json.loads(self.storage.read_bytes(CONFIG))
    except ValueError as e:
      raise WorkdirError(f"{where}: cannot read the run's configuration ({e}); restore it or use a new --workdir") from e
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
      raise WorkdirError(f"{where}: expected a JSON object with a 'config' mapping, found {str(record)[:200]}")
    return record

  def write_run(self, config: ml_collections.ConfigDict, **facts: Any) -> None:
    """Writes `config.json`: the config and `facts` (datasets, categories); a reader never sees half of it."""
    record = {"config": config.to_dict(), **facts}
    self.storage.write_bytes(CONFIG, (json.dumps(record, indent=2, default=str) + "\n").encode())

  def check_config(self, config: ml_collections.ConfigDict) -> list[str]:
    """Compares `config` with the run's own: raises WorkdirError naming the fields that differ outside
    SAFE_OVERRIDES; returns the safe fields that differ (for the log)."""
    # Imported here: `panoptic_jax.main` imports this module before it re-executes itself, and should stay light.
    from panoptic_jax.training import config as config_lib

    record = self.read_run()
    if record is None:
      return []
    # The recorded config rebuilt on this version's base: fields added since take their defaults.
    recorded = config_lib.from_record(record, self.url(CONFIG))
    saved, given = (_flatten(json.loads(json.dumps(c.to_dict(), default=str))) for c in (recorded, config))
    differing = sorted(f for f in saved.keys() | given.keys() if saved.get(f) != given.get(f))
    unsafe = [f for f in differing if not _is_safe(f)]
    if unsafe:
      shown = "; ".join(f"{f}: {saved.get(f)!r} in the run, {given.get(f)!r} now" for f in unsafe[:8])
      more = f" (and {len(unsafe) - 8} more)" if len(unsafe) > 8 else ""
      raise WorkdirError(
          f"{self} holds a run trained with another configuration: {shown}{more}. Leave out --config to use "
          f"the run's own ({self.url(CONFIG)}; overrides of {', '.join(SAFE_OVERRIDES)} are allowed), or pass "
          "another --workdir to start a new run.")
    return [f"{f}: {saved.get(f)!r} -> {given.get(f)!r}" for f in differing]

  @contextlib.contextmanager
  def lock(self) -> Iterator[Lease]:
    """Holds the workdir's lease for the duration (see the module docstring): a second run started on this workdir
    stops with WorkdirError instead of interleaving checkpoints. Also the first write of a run, so a missing or
    unwritable location is a StorageError before anything compiles."""
    lease = Lease(self.storage)
    lease.acquire()
    try:
      yield lease
    finally:
      lease.release()


class Lease:
  """The workdir's `lock` file held by this process: taken, renewed in a background thread, removed at the end."""

  def __init__(self, storage: storage_lib.Storage):
    self._storage = storage
    self._record = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                    "since": datetime.datetime.now().isoformat(timespec="seconds")}
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.lost: str | None = None  # Why the lease was lost (another run took it over), or None while held.

  def _read(self) -> dict[str, Any] | None:
    if not self._storage.exists(LOCK):
      return None
    try:
      record = json.loads(self._storage.read_bytes(LOCK))
    except ValueError:
      return None  # Half-written by a process that died while writing it, or a lock of an earlier version: free.
    return record if isinstance(record, dict) and "owner" in record else None

  def _write(self) -> None:
    now = time.time()
    self._storage.write_bytes(LOCK, json.dumps({**self._record, "renewed": now, "expires": now + LEASE_S}).encode())

  def acquire(self) -> None:
    holder = self._read()
    if holder is not None and _is_live(holder):
      raise WorkdirError(f"{self._storage.url()} is in use by another run ({_describe(holder)}); wait for it to "
                         "finish or stop it, or pass another --workdir")
    if holder is not None:
      logging.warning("Taking over the workdir lease of a run that is gone (%s).", _describe(holder))
    self._write()
    time.sleep(SETTLE_S)
    holder = self._read()
    if holder is None or holder["owner"] != self._record["owner"]:
      raise WorkdirError(f"{self._storage.url()}: another run took the workdir at the same moment "
                         f"({_describe(holder) if holder else 'its lease vanished'}); pass another --workdir")
    self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(RENEW_EVERY_S):
      try:
        holder = self._read()
        if holder is not None and holder["owner"] != self._record["owner"]:
          self.lost = f"another run took over the workdir ({_describe(holder)})"
          logging.error("Workdir lease lost: %s; this run writes no more checkpoints.", self.lost)
          return
        self._write()
      except storage_lib.StorageError as e:  # Retried until the lease would expire; the next renewal tries again.
        logging.warning("Could not renew the workdir lease: %s", e)

  def check(self) -> None:
    """Raises WorkdirError when another run has taken the lease over (this run must not write checkpoints)."""
    if self.lost is not None:
      raise WorkdirError(f"{self._storage.url()}: {self.lost}; stopping without saving")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._read()
    if holder is not None and holder["owner"] == self._record["owner"]:
      self._storage.delete(LOCK)


def _is_live(holder: dict[str, Any]) -> bool:
  """Whether a lease record still holds: not expired, and not that of a process of this host that is gone."""
  if float(holder.get("expires", 0)) <= time.time():
    return False
  if holder.get("host") == socket.gethostname():
    try:
      os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
      return False
    except (PermissionError, ValueError, KeyError):
      pass
  return True


def _describe(holder: dict[str, Any]) -> str:
  left = float(holder.get("expires", 0)) - time.time()
  expiry = f"its lease expires in {left:.0f} s" if left > 0 else "its lease has expired"
  return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}; {expiry}"
