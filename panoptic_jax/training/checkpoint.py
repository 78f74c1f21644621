"""Orbax checkpoints of the train state and the Grain iterator, and a preemption guard.

A checkpoint holds two items: `state` (a pytree of arrays: parameters, batch statistics, optimizer state, step, RNG)
and `data` (the input iterator's position), so that a resumed run sees exactly the batches the interrupted run would
have seen. Saves are asynchronous; restoring onto another mesh reshards to the shardings of the abstract target.

A complete checkpoint is never moved or skipped because the code or config disagrees with it: a checkpoint whose
arrays do not fit the model being restored is a `CheckpointMismatchError` that names the first differing array. Only
a save that is provably partial (Orbax's temporary folder of an interrupted save) or corrupt (its metadata or arrays
do not read back) is skipped, with a warning naming it; a writer (the run that holds the workdir's lock) also
renames it aside and removes interrupted saves, a reader touches nothing.
"""

import contextlib
import errno
import logging
import shutil
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

from panoptic_jax.errors import UserError
from panoptic_jax.training import orbax_s3


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


class DiskFullError(UserError, OSError):
  """A checkpoint could not be written for lack of space; the message names the folder and the space needed."""


def _is_disk_full(error: BaseException) -> bool:
  """ENOSPC, as an OSError or in the text of the errors that tensorstore and Orbax raise around it."""
  while error is not None:
    if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class CheckpointMismatchError(UserError, ValueError):
  """A complete checkpoint whose arrays do not fit the state being restored (another model or config)."""


class CheckpointNotFoundError(UserError, LookupError):
  """No checkpoint at the step asked for."""


def leaf_name(path) -> str:
  """`params.backbone.stem.conv.kernel` for a tree path (dict keys, indices and attributes alike)."""
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return ".".join(names[:-1] if names and names[-1] == "value" else names)


def _by_name(tree) -> dict[str, Any]:
  return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored(leaf) -> tuple[tuple[int, ...], str]:
  """A leaf's shape and dtype as a checkpoint stores it (a PRNG key as its key data)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.eval_shape(jax.random.key_data, leaf)
  return tuple(leaf.shape), str(np.dtype(leaf.dtype))


def _leaves(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  return {leaf_name(path): _stored(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def first_mismatch(saved, target) -> str | None:
  """The first difference between two trees of arrays (or their metadata) as a sentence, or None if they fit."""
  saved, target = _leaves(saved), _leaves(target)
  for name in sorted(saved.keys() | target.keys()):
    if name not in target:
      return f"the checkpoint has {name} {saved[name][0]}, which the model does not have"
    if name not in saved:
      return f"the model has {name} {target[name][0]}, which the checkpoint does not have"
    if saved[name] != target[name]:
      return (f"{name} is {saved[name][0]} {saved[name][1]} in the checkpoint and {target[name][0]} "
              f"{target[name][1]} in the model")
  return None


def _remove_uncommitted(directory: epath.Path) -> None:
  """Removes the step folders of a bucket that lack Orbax's commit marker: saves interrupted when their process died.
  (Orbax's own clean-up knows only the temporary names of local saves; the step would otherwise be written into the
  leftovers when the run gets there again.)"""
  if not directory.exists():
    return
  for step in directory.iterdir():
    if step.name.isdigit() and not (step / orbax_s3.COMMIT_MARKER).exists():
      logging.warning("Removing %s: a checkpoint whose save was interrupted (no %s).", step, orbax_s3.COMMIT_MARKER)
      step.rmtree()


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the newest `keep`, restores the newest readable one.

  Args:
    directory: the checkpoints folder.
    every: save period in steps (0: only on demand).
    keep: how many of the newest checkpoints to keep.
    async_save: write in the background.
    writer: True for the run that owns the folder (it holds the workdir's lock): it may remove interrupted saves and
      set aside corrupt ones. False (evaluation) changes nothing on disk.
  """

  def __init__(self, directory: str, every: int, keep: int, async_save: bool = True, writer: bool = True):
    self.every = every
    self._writer = writer
    self._state_bytes = 0
    in_bucket = orbax_s3.is_object_store(directory)
    if directory.startswith("s3://"):
      orbax_s3.install()
    path = epath.Path(directory) if in_bucket else epath.Path(directory).absolute()
    if in_bucket and writer and jax.process_index() == 0:
      _remove_uncommitted(path)
    self._manager = ocp.CheckpointManager(
        path,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=writer, create=writer,
            read_only=not writer, atomicity_options=orbax_s3.ATOMICITY_FOR_OBJECT_STORES if in_bucket else None),
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
    self._state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    with self._disk_full_as_user_error():
      return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  @contextlib.contextmanager
  def _disk_full_as_user_error(self):
    """A full disk while saving (or finishing an asynchronous save) becomes one DiskFullError naming the folder, its
    free space and the size of a checkpoint."""
    try:
      yield
    except Exception as e:  # Orbax / tensorstore wrap the OSError in several types.
      if not _is_disk_full(e):
        raise
      directory = epath.Path(self._manager.directory)
      free = shutil.disk_usage(directory).free if directory.exists() else 0
      raise DiskFullError(
          f"no space left to write a checkpoint in {directory}: a checkpoint takes about "
          f"{self._state_bytes / 1e9:.2f} GB and {free / 1e9:.2f} GB are free; free some space (or lower "
          "train.keep_checkpoints) and rerun the same command: the run resumes from the newest complete checkpoint"
      ) from e

  def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None, step: int | None = None
              ) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that reads back whole (older ones are tried in turn), or the one at `step`.

    Args:
      abstract_state: the state's structure as `jax.ShapeDtypeStruct`s with the target shardings. It may hold only
        some of the saved state's top-level entries (e.g. "params" and "model_state" for inference): only those are
        read.
      data_iterator: restored in place when given.
      step: restore this step only (None: the newest readable one).

    Returns:
      (state, step), or None when the directory holds no readable checkpoint (or `step` does not read back).

    Raises:
      CheckpointMismatchError: a complete checkpoint does not fit `abstract_state`; nothing is moved.
      CheckpointNotFoundError: there is no checkpoint at `step`.
    """
    self._manager.wait_until_finished()  # A save of this process still in flight is read back whole.
    steps = sorted(self._manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointNotFoundError(f"no checkpoint at step {step} in {self._manager.directory}; it holds steps "
                                      f"{sorted(steps) or 'none'}")
      steps = [step]
    for step in steps:
      try:
        saved = self._manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if not jax.tree.leaves(saved):
          raise FileNotFoundError("no array metadata in the step's state folder")
      except Exception as e:  # Orbax raises many types for missing or truncated metadata.
        self._skip(step, "its metadata does not read back", e)
        continue
      partial = isinstance(saved, dict) and isinstance(abstract_state, dict) and saved.keys() > abstract_state.keys()
      if partial:
        saved = {k: v for k, v in saved.items() if k in abstract_state}
      mismatch = first_mismatch(saved, abstract_state)
      if mismatch is not None:
        raise CheckpointMismatchError(
            f"the checkpoint at step {step} in {self._manager.directory} does not fit the model being restored: "
            f"{mismatch}. It was written by a run with another model or config; use that run's own config (leave "
            "out --config to take the workdir's config.json), or pass another --workdir to start afresh. Nothing "
            "was moved or deleted.")
      # Restored in the checkpoint's own tree and matched to the target by array name: containers without arrays
      # (e.g. an optimizer's empty states) may differ between the code that saved and the code that restores.
      target = _by_name(abstract_state)
      in_saved_tree = jax.tree_util.tree_map_with_path(lambda path, _: target[leaf_name(path)], saved)
      items = {"state": ocp.args.PyTreeRestore(
          in_saved_tree, restore_args=ocp.checkpoint_utils.construct_restore_args(in_saved_tree),
          partial_restore=partial)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # Its metadata fits, so a failure here is a truncated or corrupted array file.
        self._skip(step, "its arrays do not read back", e)
        continue
      arrays = _by_name(restored["state"])
      paths, treedef = jax.tree_util.tree_flatten_with_path(abstract_state)
      return jax.tree_util.tree_unflatten(treedef, [arrays[leaf_name(path)] for path, _ in paths]), step
    return None

  def _skip(self, step: int, why: str, error: Exception) -> None:
    logging.warning("Checkpoint step %d in %s is corrupt: %s (%s: %s); trying the previous one.", step,
                    self._manager.directory, why, type(error).__name__, str(error).splitlines()[0][:200])
    if self._writer:
      self._set_aside(step)

  def _set_aside(self, step: int) -> None:
    """Renames a corrupt step to `<step>.corrupt-<time>` (kept for inspection), so that the run can save it again
    when it gets there (`save` skips existing steps, so every later restart would fall back further)."""
    path = epath.Path(self._manager.directory) / str(step)
    if jax.process_index() == 0 and path.exists():
      target = path.parent / f"{step}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
      path.rename(target)
      logging.warning("Moved the corrupt checkpoint to %s.", target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def wait(self) -> None:
    with self._disk_full_as_user_error():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
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
