"""Orbax checkpoints of the train state and the Grain iterator, and a preemption guard.

A checkpoint holds two items: `state` (a pytree of arrays: parameters, batch statistics, optimizer state, step, RNG)
and `data` (the input iterator's position), so that a resumed run sees exactly the batches the interrupted run would
have seen. Saves are asynchronous; restoring onto another mesh reshards to the shardings of the abstract target.
"""

import contextlib
import logging
import signal
import threading
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils


# Orbax splits each replicated array into one slice per replica so that hosts write in parallel; every slice is an
# eager XLA op compiled per shape (tens of seconds for a model's thousand small arrays on the first save). Slices
# smaller than this are not worth it: such arrays are written whole by one replica.
_MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's standard pytree handler with the replica-slice threshold above (a private registry, not the global one)."""
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (np.number, ocp.type_handlers.ScalarHandler()),
      (int, ocp.type_handlers.ScalarHandler()),
      (float, ocp.type_handlers.ScalarHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep`, restores the newest readable one."""

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
    self.every = every
    self._manager = ocp.CheckpointManager(
        epath.Path(directory).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True, create=True),
        item_handlers={"state": _state_handler(), "data": grain.checkpoint.CheckpointHandler()})

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self._manager.all_steps():
      return False
    items = {"state": ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None
                     ) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that reads back whole; older ones are tried in turn.

    Args:
      abstract_state: the state's structure as `jax.ShapeDtypeStruct`s with the target shardings.
      data_iterator: restored in place when given.

    Returns:
      (state, step), or None when the directory holds no readable checkpoint.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      items = {"state": ocp.args.PyTreeRestore(
          abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # Orbax raises many types for a truncated or corrupted step; all mean "skip it".
        logging.warning("Checkpoint step %d in %s is unreadable (%s: %s); trying the previous one.",
                        step, self._manager.directory, type(e).__name__, str(e).splitlines()[0][:200])
        self._set_aside(step)
        continue
      return restored["state"], step
    return None

  def _set_aside(self, step: int) -> None:
    """Renames an unreadable step to `<step>.unreadable-<time>` (kept for inspection), so that the run can save it
    again when it gets there (`save` skips existing steps, so every later restart would fall back further)."""
    path = epath.Path(self._manager.directory) / str(step)
    if jax.process_index() == 0 and path.exists():
      target = path.parent / f"{step}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}"
      path.rename(target)
      logging.warning("Moved the unreadable checkpoint to %s.", target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a flag that the training loop polls, so it can save before exiting.

  With several processes the flag is OR-ed across them (every process must save the same step together).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    del frame
    logging.warning("Received %s: saving a checkpoint and stopping.", signal.Signals(signum).name)
    self._event.set()

  @contextlib.contextmanager
  def installed(self):
    """Installs the handlers (main thread only) and restores the previous ones on exit."""
    if threading.current_thread() is not threading.main_thread():
      yield self
      return
    for signum in (signal.SIGTERM, signal.SIGINT):
      self._previous[signum] = signal.signal(signum, self._handle)
    try:
      yield self
    finally:
      for signum, handler in self._previous.items():
        signal.signal(signum, handler)

  def requested(self) -> bool:
    """Whether any process received a stop signal (a collective call when there are several processes)."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))
