"""Checkpoints and workdirs in `gs://` locations, against the local GCS emulator (tests/gcs_server.py).

Orbax writes gs:// natively: tensorstore's gcs driver for the arrays (pointed at the emulator by
TENSORSTORE_GCS_HTTP_URL), etils.epath / gcsfs for the small files and google-cloud-storage for its bucket checks;
completeness is Orbax's commit file, as on S3. Skipped without the optional packages of requirements-gcs.txt.
"""

import json

import jax
import numpy as np
import pytest

from panoptic_jax.data import storage as storage_lib
from panoptic_jax.training import checkpoint, metrics_writer, orbax_s3, sharding
from panoptic_jax.training import workdir as workdir_lib
from tests import gcs_server as gcs_server_lib
from tests.training import train_helpers as th
from tests.training.test_checkpoint import _abstract, _iterator, _state

pytestmark = pytest.mark.skipif(not gcs_server_lib.gcs_packages_installed(),
                                reason=gcs_server_lib.MISSING_PACKAGES_REASON)


def test_checkpoints_in_gcs_save_keep_the_newest_restore_and_drop_uncommitted_steps(gcs_root):
  mesh = sharding.make_mesh(-1, 1)
  location = f"gs://{gcs_root}/checkpoints"
  bucket = storage_lib.open_storage(location)
  ckpt = checkpoint.Checkpointer(location, every=2, keep=2, async_save=False)
  iterator = _iterator()
  saved = {}
  for step in range(1, 7):
    next(iterator)
    if ckpt.save(step, _state(mesh, step), iterator):
      saved[step] = _state(mesh, step)
  ckpt.close()
  assert sorted(saved) == [2, 4, 6] and bucket.list_folders() == ["4", "6"]  # Keeps the newest 2.
  assert bucket.exists(f"6/{orbax_s3.COMMIT_MARKER}")
  # Arrays went through tensorstore's gcs driver into the emulator's bucket (OCDBT files under the state item).
  assert bucket.list_folders("6/state"), bucket.list_files("6/state")

  # A step whose writer died before the commit marker: every file of step 6 but the marker, as step 8.
  for relpath in _files(bucket, "6"):
    if not relpath.endswith(orbax_s3.COMMIT_MARKER):
      bucket.write_bytes(relpath.replace("6/", "8/", 1), bucket.read_bytes(relpath))
  reader = checkpoint.Checkpointer(location, every=2, keep=2, writer=False)
  fresh = _iterator()
  state, step = reader.restore(_abstract(_state(mesh, 1)), fresh)
  reader.close()
  assert step == 6  # The uncommitted step 8 is not a checkpoint ...
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), state, saved[6])
  reference = _iterator()
  for _ in range(6):
    next(reference)
  np.testing.assert_array_equal(next(fresh), next(reference))  # The iterator goes on after 6 batches.
  assert bucket.list_folders() == ["4", "6", "8"]  # ... and a reader leaves it in place;
  checkpoint.Checkpointer(location, every=2, keep=2).close()  # a writer (as a training run opens) removes it.
  assert bucket.list_folders() == ["4", "6"] and not _files(bucket, "8")


def _files(bucket, folder: str) -> list[str]:
  """Every file under `folder`, recursively, as paths relative to the bucket location."""
  found = [f"{folder}/{name}" for name in bucket.list_files(folder)]
  for sub in bucket.list_folders(folder):
    found += _files(bucket, f"{folder}/{sub}")
  return found


def test_a_gcs_workdir_holds_the_runs_records_and_sees_only_committed_checkpoints(gcs_root, monkeypatch):
  """What a training run writes into a gs:// workdir besides the checkpoints, through the same Storage and Workdir
  code as an s3:// one (test_workdir_in_bucket.py trains, stops and resumes there): config.json, the lease, metrics
  and TensorBoard events; and the steps it lists are the committed ones."""
  monkeypatch.setattr(workdir_lib, "SETTLE_S", 0.05)
  location = f"gs://{gcs_root}/run"
  wd = workdir_lib.Workdir(location)
  assert wd.in_bucket and wd.read_run() is None and wd.checkpoint_steps() == []
  config = th.config(th.tiny_dataset())
  with wd.lock():
    assert wd.storage.exists("lock")
    wd.write_run(config, train_location="train", val_location="val", categories=["a"], is_thing=[True])
    writer = metrics_writer.MetricsWriter(wd.storage, after_step=0)
    for step in (1, 2):
      writer.write(step, {"loss": 22.0 + step}, prefix="train/")
    writer.close()
  assert not wd.storage.exists("lock")  # Given back at the end.
  assert wd.read_run()["config"] == json.loads(json.dumps(config.to_dict(), default=str))
  assert wd.check_config(config) == []
  rows = [json.loads(line) for line in wd.storage.read_bytes("metrics.jsonl").decode().splitlines()]
  assert rows == [{"step": 1, "train/loss": 23.0}, {"step": 2, "train/loss": 24.0}]
  assert wd.storage.list_files("tensorboard")
  # A committed step and one without Orbax's commit marker (its writer died).
  for step, files in ((4, ["_CHECKPOINT_METADATA", orbax_s3.COMMIT_MARKER]), (6, ["_CHECKPOINT_METADATA"])):
    for name in files:
      wd.storage.write_bytes(f"checkpoints/{step}/{name}", b"{}")
  assert wd.checkpoint_steps() == [4]
