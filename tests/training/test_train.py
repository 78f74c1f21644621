"""The training system end to end on the tiny model: meshes, resume, SIGTERM, guard rails, evaluation outputs.

Runs share compiled programs: the 1-device and (8, 1) reference runs happen once per session (train_helpers.memo),
and every other run reuses their shapes and meshes, so only (4, 2) and the evaluation compile anew.
"""

import json
import logging
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panoptic_jax.training import sharding, train
from tests.training import train_helpers as th

pytestmark = pytest.mark.slow
SUBPROCESS_TIMEOUT_S = 300


def sigterm_run():
  """main.py on (8, 1) stopped by SIGTERM after its first logged step: (workdir, stopped step, console log)."""
  def compute():
    workdir = th.session_dir() / "sigterm"
    log_path = th.session_dir() / "sigterm.log"
    command = th.main_command(workdir, "train", th.tiny_dataset())
    with open(log_path, "w") as log:
      process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=th.subprocess_env(8),
                                 cwd=th.REPO_ROOT)
      try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not th.losses(workdir):
          assert process.poll() is None, f"main.py ended early:\n{log_path.read_text()[-3000:]}"
          assert time.monotonic() < deadline, "no step was logged in time"
          time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
      finally:
        th.kill(process)
    text = log_path.read_text()
    assert returncode == 0, text[-3000:]
    return workdir, max(th.losses(workdir)), text
  return th.memo("sigterm", compute)


# ----------------------------------------------------------------------------------------------------------------------
# Meshes


def test_losses_on_one_device_and_on_the_8x1_mesh_agree():
  reference = th.losses(th.one_device_run())
  assert sorted(reference) == list(range(1, th.STEPS + 1))
  assert all(np.isfinite(v) for v in reference.values())
  workdir, _ = th.mesh_8x1_run()
  th.assert_close(th.losses(workdir), reference)
  assert sorted(th.losses(workdir)) == sorted(reference)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoints_every_n_steps_keep_the_newest_k():
  workdir, _ = th.mesh_8x1_run()
  assert th.checkpoint_steps(workdir) == [4, 6]  # checkpoint_every=2, keep_checkpoints=2 over 6 steps.
  assert [p.name for p in (workdir / "checkpoints").iterdir() if not p.name.isdigit()] == []


def test_sigterm_saves_the_stopped_step_and_exits_cleanly():
  workdir, stopped, log = sigterm_run()
  assert 1 <= stopped < th.STEPS, stopped
  assert stopped in th.checkpoint_steps(workdir)
  assert f"Stopped at step {stopped} after a stop signal" in log
  assert "Received SIGTERM" in log


def test_resume_after_sigterm_reproduces_the_uninterrupted_run_exactly():
  workdir, stopped, _ = sigterm_run()
  resumed = th.session_dir() / "resumed"
  shutil.copytree(workdir, resumed)
  th.run_in_process(resumed, "train")
  uninterrupted, _ = th.mesh_8x1_run()
  expected = th.train_metrics(uninterrupted)
  assert th.train_metrics(resumed) == expected  # Every logged scalar, bit for bit, steps 1..6.
  assert max(th.checkpoint_steps(resumed)) == th.STEPS


def test_a_resumed_run_keeps_one_metrics_row_per_step():
  """A run killed after logging steps past its newest checkpoint logs them again when resumed: metrics.jsonl keeps
  one row per step, the resumed run's (bit-equal to the uninterrupted run's)."""
  uninterrupted, _ = th.mesh_8x1_run()
  workdir = th.session_dir() / "killed_after_step_6"
  shutil.copytree(uninterrupted, workdir)
  shutil.rmtree(workdir / "checkpoints" / "6")  # As if killed before that checkpoint was complete.
  th.run_in_process(workdir, "train")
  steps = [r["step"] for r in th.read_metrics(workdir) if "train/loss" in r]
  assert steps == list(range(1, th.STEPS + 1))
  assert th.train_metrics(workdir) == th.train_metrics(uninterrupted)


def test_restore_on_another_mesh_skipping_a_corrupted_newer_step(caplog):
  workdir, stopped, _ = sigterm_run()
  other = th.session_dir() / "mesh_4x2"
  shutil.copytree(workdir, other)
  # A corrupted newer step: a copy of the good one with its array files cut short.
  shutil.copytree(other / "checkpoints" / str(stopped), other / "checkpoints" / "5")
  for path in (other / "checkpoints" / "5" / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
  with caplog.at_level(logging.WARNING):
    th.run_in_process(other, "train", mesh__data=4, mesh__fsdp=2)
  assert any("Checkpoint step 5" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
  losses_4x2 = th.losses(other)
  continued = {s: v for s, v in losses_4x2.items() if s > stopped}
  assert sorted(continued) == list(range(stopped + 1, th.STEPS + 1))
  uninterrupted, _ = th.mesh_8x1_run()  # The checkpoint comes from (8, 1): compare with the (8, 1) run.
  th.assert_close(continued, th.losses(uninterrupted))
  assert th.checkpoint_steps(other)[-1] == th.STEPS  # Step 5 was set aside, so its new save is not skipped.
  assert len(list((other / "checkpoints").glob("5.corrupt-*"))) == 1


# ----------------------------------------------------------------------------------------------------------------------
# Guard rails


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  compiled = train.jit_train_step

  def with_nan_at_step_3(*args, **kwargs):
    step_fn = compiled(*args, **kwargs)

    def step(state, batch, rng):
      state, metrics = step_fn(state, batch, rng)
      return state, {**metrics, "loss": jnp.where(state["step"] == 3, jnp.nan, metrics["loss"])}

    return jax.jit(step)  # Jitted like the real step: the loop compiles it ahead of time.

  monkeypatch.setattr(train, "jit_train_step", with_nan_at_step_3)
  with pytest.raises(train.TrainingError, match=r"Non-finite loss at step 3 .*base_lr"):
    th.run_in_process(tmp_path, "train")
  assert th.checkpoint_steps(tmp_path) == [2]
  assert sorted(th.losses(tmp_path)) == [1, 2]
  monkeypatch.undo()
  uninterrupted, _ = th.mesh_8x1_run()
  assert th.losses(tmp_path) == {s: v for s, v in th.losses(uninterrupted).items() if s <= 2}


def test_a_batch_the_devices_cannot_split_fails_before_compiling(tmp_path, monkeypatch):
  def no_compiling(*args, **kwargs):
    raise AssertionError("create_state ran: the batch size must be checked first")

  monkeypatch.setattr(train, "create_state", no_compiling)
  with pytest.raises(sharding.ShardingError, match=r"config.train.batch_size: 6 images .* 8 devices"):
    th.run_in_process(tmp_path, "train", train__batch_size=6)


def test_out_of_memory_errors_get_a_hint():
  error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 34359738368 bytes.\nBuffer...")
  hint = train._oom_hint(error)
  assert isinstance(hint, train.TrainingError)
  for advice in ("remat", "bfloat16", "crop_size", "batch_size", "fsdp"):
    assert advice in str(hint)
  assert "34359738368 bytes" in str(hint) and "Buffer" not in str(hint)
  assert train._oom_hint(ValueError("shapes do not match")) is None


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation and outputs


def test_train_and_eval_writes_metrics_pictures_tensorboard_and_config():
  workdir, results = th.mesh_8x1_run()
  records = th.read_metrics(workdir)
  evals = [r for r in records if "eval/PQ" in r]
  assert [r["step"] for r in evals] == [th.STEPS]
  assert evals[0]["eval/PQ"] == pytest.approx(results["scalars"]["PQ"])
  assert "mIoU" in results["scalars"] and results["table"]
  pictures = sorted((workdir / "visualizations").glob("*.png"))
  assert len(pictures) == 2 and all(p.name.startswith(f"step{th.STEPS:07d}_") for p in pictures)
  assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["config"]["train"]["steps"] == th.STEPS
  assert saved["train_location"] == str(th.tiny_dataset() / "train")


def test_eval_mode_evaluates_the_newest_checkpoint():
  trained, results = th.mesh_8x1_run()
  workdir = th.session_dir() / "eval_only"
  shutil.copytree(trained / "checkpoints", workdir / "checkpoints")
  evaluated = th.run_in_process(workdir, "eval")
  assert evaluated["scalars"] == results["scalars"]  # The same state (step 6) gives the same numbers.
  records = th.read_metrics(workdir)
  assert [r["step"] for r in records] == [th.STEPS] and "eval/PQ" in records[0]
  assert len(list((workdir / "visualizations").glob(f"step{th.STEPS:07d}_*.png"))) == 2
