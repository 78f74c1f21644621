"""A workdir in a bucket (`s3://`, against the SeaweedFS server the tests start): train, stop, resume, evaluate,
predict, and the failures a user meets first.

The runs use the tiny config of train_helpers and compare with its in-memory references (the uninterrupted 6-step
run on the (8, 1) mesh), so they add no compilation of their own.
"""

import json
import signal
import subprocess
import time

import pytest

from panoptic_jax.data import storage
from panoptic_jax.inference import export, serving, trained_model
from panoptic_jax.training import checkpoint, train
from panoptic_jax.training import workdir as workdir_lib
from tests.training import train_helpers as th

pytestmark = pytest.mark.slow
SUBPROCESS_TIMEOUT_S = 300


def _train_metrics(location: str) -> dict[int, dict[str, float]]:
  bucket = storage.open_storage(location)
  if not bucket.exists("metrics.jsonl"):
    return {}
  rows = [json.loads(line) for line in bucket.read_bytes("metrics.jsonl").decode().splitlines()]
  return {int(r["step"]): {k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def stopped_and_resumed(s3_server):
  """main.py with an s3:// workdir, stopped by SIGTERM after its first logged step, then resumed in this process:
  (location, stopped step, console log of the stopped run)."""
  with pytest.MonkeyPatch.context() as patch:
    for name, value in s3_server.env().items():
      patch.setenv(name, value)
    location = f"s3://{s3_server.shared_bucket()}/workdir-in-bucket/run"
    log_path = th.session_dir() / "bucket_run.log"
    with open(log_path, "w") as log:
      process = subprocess.Popen(th.main_command(location, "train", th.tiny_dataset()), stdout=log,
                                 stderr=subprocess.STDOUT, env=th.subprocess_env(8), cwd=th.REPO_ROOT)
      try:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while not _train_metrics(location):
          assert process.poll() is None, f"main.py ended early:\n{log_path.read_text()[-3000:]}"
          assert time.monotonic() < deadline, "no step was logged in time"
          time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=180) == 0, log_path.read_text()[-3000:]
      finally:
        th.kill(process)
    stopped = max(_train_metrics(location))
    th.run_in_process(location, "train")
    yield location, stopped, log_path.read_text()


def test_a_run_in_a_bucket_stopped_by_sigterm_resumes_exactly(stopped_and_resumed):
  location, stopped, log = stopped_and_resumed
  assert 1 <= stopped < th.STEPS and f"Stopped at step {stopped} after a stop signal" in log
  uninterrupted, _ = th.mesh_8x1_run()
  assert _train_metrics(location) == th.train_metrics(uninterrupted)  # Every logged scalar, steps 1..6, bit for bit.
  wd = workdir_lib.Workdir(location)
  assert wd.checkpoint_steps() == [4, 6]
  bucket = wd.storage
  assert bucket.exists("config.json") and not bucket.exists("lock")  # The lease is given back at the end.
  assert bucket.list_files("tensorboard"), "no TensorBoard events in the bucket"


def test_eval_mode_prediction_and_export_read_the_run_from_the_bucket(stopped_and_resumed):
  location, _, _ = stopped_and_resumed
  _, uninterrupted = th.mesh_8x1_run()
  assert th.run_in_process(location, "eval")["scalars"] == uninterrupted["scalars"]  # The same state (step 6).
  pictures = storage.open_storage(f"{location}/visualizations").list_files()
  assert len(pictures) == 2 and all(name.startswith("step0000006_") for name in pictures), pictures
  model = trained_model.load(location)
  assert model.step == th.STEPS and model.workdir == location
  export.export(model, f"{location}-exported", platforms=("cpu",))  # An artifact in a bucket, and served from there.
  loaded = serving.load(f"{location}-exported")
  assert loaded.manifest["source"] == {"workdir": location, "step": th.STEPS, "preset": "kmax_tiny"}


def test_a_checkpoint_half_written_when_the_process_died_is_ignored(stopped_and_resumed, s3_server):
  """A step folder without Orbax's commit marker (the process died while writing it) is not a checkpoint: it is
  neither listed nor restored, and the run that trains there next removes it (an evaluation touches nothing)."""
  location, _, _ = stopped_and_resumed
  fs, bucket_path = s3_server.filesystem(), location.removeprefix("s3://")
  for name in fs.find(f"{bucket_path}/checkpoints/6"):
    if not name.endswith("commit_success.txt"):
      fs.copy(name, name.replace("/checkpoints/6/", "/checkpoints/8/"))
  assert fs.exists(f"{bucket_path}/checkpoints/8/_CHECKPOINT_METADATA")
  assert workdir_lib.Workdir(location).checkpoint_steps() == [4, 6]
  assert trained_model.load(location).step == 6
  assert fs.exists(f"{bucket_path}/checkpoints/8/_CHECKPOINT_METADATA")
  checkpoint.Checkpointer(f"{location}/checkpoints", every=1, keep=2, writer=True).close()  # As a training run opens.
  assert workdir_lib.Workdir(location).checkpoint_steps() == [4, 6]
  assert not fs.exists(f"{bucket_path}/checkpoints/8/_CHECKPOINT_METADATA")


def test_a_missing_bucket_is_one_clear_error_before_anything_compiles(s3_env, monkeypatch):
  def compiled_anyway(*args, **kwargs):
    raise AssertionError("the model was built before the workdir was checked")

  monkeypatch.setattr(train, "create_state", compiled_anyway)
  with pytest.raises(storage.StorageError) as error:
    train.run(th.config(th.tiny_dataset()), "s3://no-such-bucket-for-a-workdir/run", "train")
  assert "no-such-bucket-for-a-workdir" in str(error.value) and "bucket" in str(error.value)
