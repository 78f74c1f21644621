"""Checkpointer and PreemptionGuard on small pytrees: cadence, retention, iterator state, resharding, bad steps.

The model-level behaviour (resume reproduces the losses, SIGTERM, restore on another mesh) is in test_train.py.
"""

import logging
import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from panoptic_jax.training import checkpoint, sharding


def _state(mesh, scale: float = 1.0) -> dict:
  """A train-state-like pytree: a batch-sharded matrix, replicated vectors and a step."""
  batch_sharded = NamedSharding(mesh, P(sharding.BATCH_AXES))
  replicated = sharding.replicated(mesh)
  return {"step": jax.device_put(jnp.asarray(3, jnp.int32), replicated),
          "params": {"w": jax.device_put(scale * jnp.arange(64.0).reshape(16, 4), batch_sharded),
                     "b": jax.device_put(scale * jnp.ones(5), replicated)}}


def _abstract(state) -> dict:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _iterator() -> grain.DatasetIterator:
  return iter(grain.MapDataset.range(40).shuffle(seed=3).batch(2).to_iter_dataset())


def _assert_trees_equal(a, b) -> None:
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_saves_every_n_steps_keeps_k_and_restores_the_newest_with_the_iterator(tmp_path):
  mesh = sharding.make_mesh(-1, 1)
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), every=2, keep=2)
  iterator = _iterator()
  saved_states = {}
  for step in range(1, 8):
    next(iterator)
    state = _state(mesh, scale=step)
    started = ckpt.save(step, state, iterator)
    assert started == (step % 2 == 0), step
    if started:
      saved_states[step] = state
  assert not ckpt.save(6, _state(mesh), iterator, force=True)  # A step is never written twice.
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["4", "6"]

  fresh = _iterator()
  restored = checkpoint.Checkpointer(str(directory), every=2, keep=2)
  state, step = restored.restore(_abstract(_state(mesh)), fresh)
  restored.close()
  assert step == 6
  _assert_trees_equal(state, saved_states[6])
  reference = _iterator()
  for _ in range(6):
    next(reference)
  for _ in range(3):  # The restored iterator goes on where the saved one was after 6 batches.
    np.testing.assert_array_equal(next(fresh), next(reference))


def test_an_empty_directory_restores_nothing_and_every_zero_saves_only_on_demand(tmp_path):
  mesh = sharding.make_mesh(-1, 1)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every=0, keep=3)
  assert ckpt.restore(_abstract(_state(mesh)), None) is None
  assert not ckpt.save(5, _state(mesh), None)
  assert ckpt.save(5, _state(mesh), None, force=True)
  ckpt.close()
  assert sorted(os.listdir(tmp_path / "c")) == ["5"]


def test_restore_onto_another_mesh_reshards(tmp_path):
  mesh_8x1 = sharding.make_mesh(8, 1)
  saved = _state(mesh_8x1, scale=2.0)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every=1, keep=1)
  ckpt.save(1, saved, None)
  ckpt.close()

  mesh_4x2 = sharding.make_mesh(4, 2)
  target = _abstract(_state(mesh_4x2))
  state, step = checkpoint.Checkpointer(str(tmp_path / "c"), every=1, keep=1).restore(target, None)
  assert step == 1
  _assert_trees_equal(state, saved)
  assert state["params"]["w"].sharding == target["params"]["w"].sharding
  assert state["params"]["w"].sharding.mesh.shape == {"data": 4, "fsdp": 2}


def _save_steps(directory, mesh, steps) -> dict:
  ckpt = checkpoint.Checkpointer(str(directory), every=1, keep=10)
  states = {}
  for step in steps:
    states[step] = _state(mesh, scale=step)
    ckpt.save(step, states[step], None)
  ckpt.close()
  return states


def test_a_partial_save_is_ignored(tmp_path):
  mesh = sharding.make_mesh(-1, 1)
  directory = tmp_path / "c"
  states = _save_steps(directory, mesh, (1, 2))
  # What a kill during an async save leaves behind: the step's files under Orbax's temporary name.
  shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp")
  ckpt = checkpoint.Checkpointer(str(directory), every=1, keep=10)
  state, step = ckpt.restore(_abstract(_state(mesh)), None)
  ckpt.close()
  assert step == 2
  _assert_trees_equal(state, states[2])
  assert not (directory / "3.orbax-checkpoint-tmp").exists()  # Cleaned up at start.


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_corrupted_latest_step_is_skipped_with_a_warning(tmp_path, caplog, damage):
  mesh = sharding.make_mesh(-1, 1)
  directory = tmp_path / "c"
  states = _save_steps(directory, mesh, (1, 2))
  files = [p for p in (directory / "2" / "state").rglob("*") if p.is_file()]
  assert files
  for path in files:
    if damage == "truncate":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
      path.unlink()
  ckpt = checkpoint.Checkpointer(str(directory), every=1, keep=10)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore(_abstract(_state(mesh)), None)
  ckpt.close()
  assert step == 1
  _assert_trees_equal(state, states[1])
  assert any("Checkpoint step 2" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
  # The bad step is kept under another name, and the run can save step 2 again when it gets there.
  assert [p.name.startswith("2.corrupt-") for p in directory.iterdir() if not p.name.isdigit()] == [True]
  ckpt = checkpoint.Checkpointer(str(directory), every=1, keep=10)
  assert ckpt.save(2, states[2], None)
  state, step = ckpt.restore(_abstract(_state(mesh)), None)
  ckpt.close()
  assert step == 2
  _assert_trees_equal(state, states[2])


def test_a_checkpoint_of_another_model_is_an_error_and_stays_in_place(tmp_path):
  """A complete checkpoint that does not fit the state being restored (another preset or config) names the first
  differing array and both shapes; no step is moved, renamed or skipped."""
  mesh = sharding.make_mesh(-1, 1)
  directory = tmp_path / "c"
  _save_steps(directory, mesh, (1, 2))
  before = sorted(os.listdir(directory))
  other = _state(mesh)
  other["params"]["w"] = jax.ShapeDtypeStruct((16, 8), jnp.float32, sharding=other["params"]["w"].sharding)
  ckpt = checkpoint.Checkpointer(str(directory), every=1, keep=10)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"step 2 .* params\.w is \(16, 4\) float32 in the "
                     r"checkpoint and \(16, 8\) float32 in the model.*Nothing was moved"):
    ckpt.restore(_abstract(other), None)
  ckpt.close()
  assert sorted(os.listdir(directory)) == before


def test_containers_without_arrays_may_change_between_saving_and_restoring(tmp_path):
  """An optimizer state whose empty parts are wrapped differently by the restoring code (a custom scale where the
  saving code had one, `optax.masked` now) restores by array name; it is neither refused nor set aside."""
  mesh = sharding.make_mesh(-1, 1)
  params = _state(mesh)["params"]

  def custom_scale(factor):
    return optax.GradientTransformation(lambda p: optax.EmptyState(),
                                        lambda u, s, p=None: (jax.tree.map(lambda x: x * factor, u), s))

  saved_tx = optax.chain(optax.scale_by_adam(), custom_scale(0.1))
  restoring_tx = optax.chain(optax.scale_by_adam(), optax.masked(optax.scale(0.1), lambda p: jax.tree.map(lambda _: True, p)))
  saved = {"params": params, "opt_state": saved_tx.init(params)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every=1, keep=2)
  ckpt.save(1, saved, None)
  ckpt.close()
  target = _abstract({"params": params, "opt_state": restoring_tx.init(params)})
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every=1, keep=2)
  state, step = ckpt.restore(target, None)
  ckpt.close()
  assert step == 1 and jax.tree.structure(state) == jax.tree.structure(target)
  _assert_trees_equal(state["params"], params)
  _assert_trees_equal(state["opt_state"][0], saved["opt_state"][0])
  assert os.listdir(tmp_path / "c") == ["1"]


def test_a_reader_skips_a_corrupt_step_but_changes_nothing_on_disk(tmp_path):
  """Evaluation (writer=False) falls back to the previous step and leaves the corrupt step and an interrupted save
  of another process where they are."""
  mesh = sharding.make_mesh(-1, 1)
  directory = tmp_path / "c"
  states = _save_steps(directory, mesh, (1, 2))
  for path in (directory / "2" / "state").rglob("*"):
    if path.is_file():
      path.unlink()
  shutil.copytree(directory / "1", directory / "3.orbax-checkpoint-tmp")
  before = sorted(os.listdir(directory))
  reader = checkpoint.Checkpointer(str(directory), every=1, keep=10, writer=False)
  state, step = reader.restore(_abstract(_state(mesh)), None)
  reader.close()
  assert step == 1
  _assert_trees_equal(state, states[1])
  assert sorted(os.listdir(directory)) == before


def test_a_full_disk_is_one_error_naming_the_folder_and_the_space_needed(tmp_path, monkeypatch):
  mesh = sharding.make_mesh(-1, 1)
  ckpt = checkpoint.Checkpointer(str(tmp_path / "c"), every=1, keep=2)

  def full(*args, **kwargs):
    raise ValueError("Error writing local file: [Errno 28] No space left on device")  # As tensorstore words it.

  monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", full)
  with pytest.raises(checkpoint.DiskFullError, match=rf"no space left to write a checkpoint in {tmp_path / 'c'}: a "
                     r"checkpoint takes about 0\.00 GB and [0-9.]+ GB are free.*rerun the same command"):
    ckpt.save(1, _state(mesh), None)
  monkeypatch.undo()
  ckpt.close()


def test_preemption_guard_turns_sigterm_into_a_flag_and_restores_the_handler():
  guard = checkpoint.PreemptionGuard()
  before = signal.getsignal(signal.SIGTERM)
  with guard.installed():
    assert not guard.requested()
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested()
  assert signal.getsignal(signal.SIGTERM) is before
