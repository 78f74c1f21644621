"""GCSStorage (gs://) against a real local GCS emulator (tests/gcs_server.py); skipped without requirements-gcs.txt."""

import multiprocessing
import pickle
import socket
import time

import pytest

from panoptic_jax.data import storage as storage_lib
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.storage import GCSStorage, StorageError, open_storage
from tests import gcs_server as gcs_server_lib
from tests.data.test_storage import FILES, _check_round_trip, _fill

pytestmark = pytest.mark.skipif(not gcs_server_lib.gcs_packages_installed(),
                                reason=gcs_server_lib.MISSING_PACKAGES_REASON)


@pytest.fixture(autouse=True)
def default_retry_budget(monkeypatch):
  """Every test starts from the default budget, whatever the environment says."""
  monkeypatch.delenv(storage_lib.RETRY_BUDGET_ENV, raising=False)


def _assert_names_location(message, server, root):
  bucket, _, prefix = root.partition("/")
  assert server.endpoint_url in message and repr(bucket) in message and prefix in message


def test_gcs_round_trip(gcs_root, gcs_server):
  storage = open_storage(f"gs://{gcs_root}/some/prefix")
  assert isinstance(storage, GCSStorage)
  assert storage.describe() == f"gs://{gcs_root}/some/prefix at {gcs_server.endpoint_url}"
  _check_round_trip(storage)
  assert storage.url("images/b.jpg") == f"gs://{gcs_root}/some/prefix/images/b.jpg"
  # Written where expected, seen by an independent client (google-cloud-storage, as Orbax uses it).
  from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
  bucket, _, prefix = gcs_root.partition("/")
  blob = gcs.Client().bucket(bucket).blob(f"{prefix}/some/prefix/images/b.jpg")
  assert blob.download_as_bytes() == b"B"
  storage.delete("images/b.jpg")
  storage.delete("images/b.jpg")  # Deleting what is not there is no error.
  assert not storage.exists("images/b.jpg") and storage.list_files("images") == ["a.jpg"]


def test_gcs_explicit_endpoint_bucket_root_and_folder_marker(gcs_server, monkeypatch):
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  bucket = gcs_server.make_bucket()
  storage = open_storage(f"gs://{bucket}", endpoint_url=gcs_server.endpoint_url)
  assert storage.describe() == f"gs://{bucket} at {gcs_server.endpoint_url}"
  storage.fs.pipe_file(f"{bucket}/x/", b"")  # Some tools create zero-byte "folder" objects.
  storage.write_bytes("x/y.txt", b"y")
  assert storage.list_files("x") == ["y.txt"] and storage.list_files() == [] and storage.list_folders() == ["x"]
  assert storage.read_bytes("x/y.txt") == b"y"


def test_gcs_missing_bucket_and_object_are_named(gcs_env):
  storage = open_storage("gs://no-such-bucket/p")
  for op in (lambda: storage.read_bytes("metadata.yaml"), lambda: storage.read_many(["a", "b"]),
             lambda: storage.list_files("images"), lambda: storage.exists("metadata.yaml"),
             lambda: Dataset.open(storage)):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at this endpoint") as e:
      op()
    _assert_names_location(str(e.value), gcs_env, "no-such-bucket/p")
  root = f"{gcs_env.shared_bucket()}/missing-object"
  with pytest.raises(StorageError, match=rf"cannot read gs://{root}/metadata\.yaml .*expected an existing object, "
                                         "found no such object") as e:
    open_storage(f"gs://{root}").read_bytes("metadata.yaml")
  _assert_names_location(str(e.value), gcs_env, root)
  assert e.value.relpath == "metadata.yaml" and e.value.location == f"gs://{root} at {gcs_env.endpoint_url}"


def test_gcs_dataset_and_worker_processes(gcs_root):
  """A pickled storage reads in a spawned worker, which builds its own client against the same emulator."""
  storage = open_storage(f"gs://{gcs_root}/ds")
  _fill(storage)
  clone = pickle.loads(pickle.dumps(storage))
  assert clone._fs is None and clone.read_bytes("images/a.jpg") == FILES["images/a.jpg"]
  with multiprocessing.get_context("spawn").Pool(1) as pool:
    assert pool.apply(GCSStorage.read_many, (storage, ["images/a.jpg", "metadata.yaml"])) == [b"A", b"task: x\n"]


def test_gcs_endpoint_that_never_answered_fails_fast(gcs_env):
  with socket.socket() as s:  # A port nobody listens on.
    s.bind(("127.0.0.1", 0))
    endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
  storage_lib.set_retry_budget(1.0)
  start = time.monotonic()
  with pytest.raises(StorageError, match=rf"the endpoint {endpoint} is unreachable: it has not answered .*"
                                         "STORAGE_EMULATOR_HOST"):
    open_storage("gs://bkt/p", endpoint_url=endpoint).read_bytes("metadata.yaml")
  assert time.monotonic() - start < 5  # gcsfs's own retry loop (about 30 s) is not in the way.


def test_gcs_errors_are_classified():
  import aiohttp  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions  # pylint: disable=g-import-not-at-top
  from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top
  transient = [HttpError({"code": 503, "message": "unavailable"}), HttpError({"code": 429, "message": "slow down"}),
               HttpError({"code": 500, "message": "oops"}), ConnectionRefusedError(), TimeoutError(),
               aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("truncated"),
               google.auth.exceptions.TransportError("metadata server")]
  permanent = [HttpError({"code": 401, "message": "Invalid Credentials"}), HttpError({"code": 400, "message": "bad"}),
               OSError("Forbidden: b/x/o\nno access"), FileNotFoundError(), ValueError(),
               google.auth.exceptions.DefaultCredentialsError("none"), google.auth.exceptions.RefreshError("revoked")]
  assert [e for e in transient if not storage_lib._is_transient_gcs(e)] == []
  assert [e for e in permanent if storage_lib._is_transient_gcs(e)] == []
  storage = GCSStorage("gs://bkt/p", endpoint_url="http://127.0.0.1:9")
  forbidden = storage._error("read", "a.jpg", OSError("Forbidden: b/bkt/o/p%2Fa.jpg\nno access"), "an existing object")
  assert "access denied: the Google credentials" in str(forbidden) and "gs://bkt/p/a.jpg" in str(forbidden)
  unauthenticated = storage._error("read", "a.jpg", HttpError({"code": 401, "message": "Login Required"}), "x")
  assert "no valid Google credentials: set GOOGLE_APPLICATION_CREDENTIALS" in str(unauthenticated)


def test_gcs_without_the_optional_packages_is_one_clear_error(monkeypatch):
  monkeypatch.setattr(storage_lib, "_importable", lambda module: module != "gcsfs")
  with pytest.raises(StorageError, match=r"gs://bkt/p: gs:// locations need the optional Google Cloud Storage "
                                         r"packages, and gcsfs is not installed: pip install -r requirements-gcs\.txt"):
    open_storage("gs://bkt/p")
