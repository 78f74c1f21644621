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
from panoptic_jax.inference import trained_model
from panoptic_jax.training import checkpoint, orbax_s3, sharding
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


@pytest.mark.slow
def test_a_training_run_with_a_gcs_workdir_logs_the_reference_losses(gcs_root):
  """The tiny 6-step run with a gs:// workdir (config, metrics, TensorBoard, lease and checkpoints in the emulator)
  logs exactly the scalars of the same run in a local folder, and its checkpoint loads back."""
  location = f"gs://{gcs_root}/run"
  th.run_in_process(location, "train")
  reference, _ = th.mesh_8x1_run()  # Shared with test_workdir_in_bucket.py (once per session).
  wd = workdir_lib.Workdir(location)
  rows = [json.loads(line) for line in wd.storage.read_bytes("metrics.jsonl").decode().splitlines()]
  logged = {int(r["step"]): {k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r}
  assert logged == th.train_metrics(reference)  # Every logged scalar, steps 1..6, bit for bit.
  assert wd.checkpoint_steps() == [4, 6] and not wd.storage.exists("lock")
  assert wd.storage.exists("config.json") and wd.storage.list_files("tensorboard")
  assert trained_model.load(location).step == th.STEPS  # The whole train state reads back from the bucket.
