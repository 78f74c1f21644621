"""Storage over a local folder and a real S3-compatible server (SeaweedFS, tests/s3_server.py)."""

import multiprocessing
import pickle
import socket
import time

import pytest

from panoptic_jax.data import storage as storage_lib
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.storage import LocalStorage, S3Storage, StorageError, open_storage

FILES = {"metadata.yaml": b"task: x\n", "images/b.jpg": b"B", "images/a.jpg": b"A", "images/sub/c.jpg": b"C",
         "panoptic_maps/a.tif": b"TA"}


def _fill(storage):
  for relpath, data in FILES.items():
    storage.write_bytes(relpath, data)


def _check_round_trip(storage):
  _fill(storage)
  assert storage.read_bytes("images/a.jpg") == b"A"
  assert storage.read_many(["images/b.jpg", "metadata.yaml", "images/a.jpg"]) == [b"B", b"task: x\n", b"A"]
  assert storage.read_many([]) == []
  assert storage.list_files("images") == ["a.jpg", "b.jpg"]  # Sorted; sub/c.jpg is not listed.
  assert storage.list_files("images/") == ["a.jpg", "b.jpg"]
  assert storage.list_files("images/sub") == ["c.jpg"]
  assert storage.list_files("") == ["metadata.yaml"]
  assert storage.list_files("nothing_here") == []
  assert storage.exists("metadata.yaml") and storage.exists("images/sub/c.jpg")
  assert not storage.exists("images/zzz.jpg")
  storage.write_bytes("images/a.jpg", b"A2")  # Overwrite.
  assert storage.read_bytes("images/a.jpg") == b"A2"
  with pytest.raises(StorageError, match=r"images/missing\.jpg.*expected .*, found (nothing there|no such object)"):
    storage.read_bytes("images/missing.jpg")
  with pytest.raises(StorageError, match=r"images/missing\.jpg"):
    storage.read_many(["images/a.jpg", "images/missing.jpg"])
  with pytest.raises(StorageError, match=r"'\.\.' is not allowed"):
    storage.read_bytes("../outside.txt")
  clone = pickle.loads(pickle.dumps(storage))
  assert clone.read_bytes("images/b.jpg") == b"B" and clone.describe() == storage.describe()


# ----------------------------------------------------------------------------------------------------------------------
# Local folders


def test_local_round_trip(tmp_path):
  storage = open_storage(tmp_path / "ds")
  assert isinstance(storage, LocalStorage) and storage.describe() == str(tmp_path / "ds")
  _check_round_trip(storage)
  assert open_storage(f"file://{tmp_path}/ds").read_bytes("images/b.jpg") == b"B"
  assert not list((tmp_path / "ds" / "images").glob(".*tmp*"))  # Atomic writes leave no temporary files.


def test_local_missing_folder_named(tmp_path):
  storage = open_storage(tmp_path / "nope")
  with pytest.raises(StorageError, match=rf"{tmp_path}/nope: cannot read 'metadata.yaml': the dataset folder itself "
                                         "does not exist"):
    storage.read_bytes("metadata.yaml")
  with pytest.raises(StorageError, match=rf"{tmp_path}/nope.*no metadata|{tmp_path}/nope.*does not exist"):
    Dataset.open(tmp_path / "nope")


def test_local_missing_metadata(tmp_path):
  (tmp_path / "images").mkdir()
  with pytest.raises(StorageError, match=rf"{tmp_path}/metadata\.yaml: expected a readable file, found nothing"):
    Dataset.open(tmp_path)


def test_unsupported_scheme():
  with pytest.raises(StorageError, match="gs://b/p: unsupported location"):
    open_storage("gs://b/p")


# ----------------------------------------------------------------------------------------------------------------------
# Retries (no server needed)


def test_retry_transient_backs_off_then_succeeds():
  calls, sleeps = [], []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionResetError("reset by peer")
    return "ok"

  assert storage_lib.retry_transient(flaky, attempts=4, sleep=sleeps.append) == "ok"
  assert len(calls) == 3 and len(sleeps) == 2 and sleeps[1] > sleeps[0] * 0.9


def test_retry_transient_is_bounded_and_skips_permanent_errors():
  sleeps = []
  with pytest.raises(ConnectionResetError):
    storage_lib.retry_transient(lambda: (_ for _ in ()).throw(ConnectionResetError()), attempts=3,
                                sleep=sleeps.append)
  assert len(sleeps) == 2

  def missing():
    raise FileNotFoundError("gone")

  sleeps.clear()
  with pytest.raises(FileNotFoundError):
    storage_lib.retry_transient(missing, sleep=sleeps.append)
  assert not sleeps


def test_retry_recognises_5xx_and_throttling():
  from botocore.exceptions import ClientError

  def translated(code, status):
    error = OSError(5, "server says no")
    error.__cause__ = ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")
    return error

  assert storage_lib._is_transient(translated("SlowDown", 503))
  assert storage_lib._is_transient(translated("InternalError", 500))
  assert not storage_lib._is_transient(translated("AccessDenied", 403))


# ----------------------------------------------------------------------------------------------------------------------
# S3 (real SeaweedFS server)


def test_s3_round_trip(s3_root, s3_server):
  storage = open_storage(f"s3://{s3_root}/some/prefix")
  assert isinstance(storage, S3Storage)
  assert storage.describe() == f"s3://{s3_root}/some/prefix at {s3_server.endpoint_url}"
  _check_round_trip(storage)
  # Written where expected, seen by an independent client.
  assert s3_server.filesystem().cat_file(f"{s3_root}/some/prefix/images/b.jpg") == b"B"


def test_s3_explicit_endpoint_and_bucket_root(s3_bucket, s3_server, monkeypatch):
  monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
  storage = open_storage(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
  assert storage.describe() == f"s3://{s3_bucket} at {s3_server.endpoint_url}"
  storage.write_bytes("x/y.txt", b"y")
  assert storage.list_files("x") == ["y.txt"] and storage.list_files() == []
  assert storage.url("x/y.txt") == f"s3://{s3_bucket}/x/y.txt"


def test_s3_folder_marker_is_not_a_file(s3_root, s3_server):
  fs = s3_server.filesystem()
  fs.pipe_file(f"{s3_root}/p/images/", b"")  # Some tools create zero-byte "folder" objects.
  fs.pipe_file(f"{s3_root}/p/images/a.jpg", b"A")
  assert open_storage(f"s3://{s3_root}/p").list_files("images") == ["a.jpg"]


def _assert_names_location(message, s3_server, root):
  bucket, _, prefix = root.partition("/")
  assert s3_server.endpoint_url in message and repr(bucket) in message and prefix in message
  assert s3_server.secret_key not in message


def test_s3_wrong_secret(s3_root, s3_server, monkeypatch):
  open_storage(f"s3://{s3_root}/p").write_bytes("metadata.yaml", b"x")
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret_key[::-1])
  storage = open_storage(f"s3://{s3_root}/p")
  for op in (lambda: storage.read_bytes("metadata.yaml"), lambda: storage.list_files("images"),
             lambda: storage.exists("metadata.yaml"), lambda: storage.write_bytes("a", b"a"),
             lambda: Dataset.open(storage)):
    with pytest.raises(StorageError, match="access denied") as e:
      op()
    _assert_names_location(str(e.value), s3_server, s3_root)
    assert "wrong-" not in str(e.value) and "metadata" not in repr(e.value.__cause__ or "")


def test_s3_unknown_access_key(s3_root, s3_server, monkeypatch):
  monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
  with pytest.raises(StorageError, match="access denied") as e:
    open_storage(f"s3://{s3_root}/p").read_bytes("metadata.yaml")
  _assert_names_location(str(e.value), s3_server, s3_root)


def test_s3_no_credentials(s3_root, s3_server, monkeypatch):
  monkeypatch.delenv("AWS_ACCESS_KEY_ID")
  monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
  with pytest.raises(StorageError, match="no AWS credentials: set AWS_ACCESS_KEY_ID") as e:
    open_storage(f"s3://{s3_root}/p").read_bytes("metadata.yaml")
  _assert_names_location(str(e.value), s3_server, s3_root)


def test_s3_missing_bucket(s3_env):
  storage = open_storage("s3://no-such-bucket/p")
  for op in (lambda: storage.read_bytes("metadata.yaml"), lambda: storage.list_files("images"),
             lambda: storage.exists("metadata.yaml"), lambda: Dataset.open(storage)):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at this endpoint") as e:
      op()
    _assert_names_location(str(e.value), s3_env, "no-such-bucket/p")


def test_s3_missing_metadata(s3_root, s3_server):
  storage = open_storage(f"s3://{s3_root}/ds")
  storage.write_bytes("images/a.jpg", b"A")
  with pytest.raises(StorageError, match=rf"cannot read s3://{s3_root}/ds/metadata\.yaml .*no such object; every "
                                         "dataset location holds metadata.yaml") as e:
    Dataset.open(f"s3://{s3_root}/ds")
  _assert_names_location(str(e.value), s3_server, s3_root)


def test_s3_object_deleted_between_listing_and_reading(s3_root, s3_server):
  storage = open_storage(f"s3://{s3_root}/p")
  _fill(storage)
  assert storage.list_files("images") == ["a.jpg", "b.jpg"]
  s3_server.filesystem().rm_file(f"{s3_root}/p/images/a.jpg")
  with pytest.raises(StorageError, match=rf"cannot read s3://{s3_root}/p/images/a\.jpg .*expected an existing "
                                         "object, found no such object"):
    storage.read_bytes("images/a.jpg")
  with pytest.raises(StorageError, match=r"images/a\.jpg"):
    storage.read_many(["images/b.jpg", "images/a.jpg"])
  assert storage.list_files("images") == ["b.jpg"]  # No stale listing cache.


def test_s3_unreachable_endpoint(s3_env, monkeypatch):
  monkeypatch.setattr(storage_lib, "BOTO_MAX_ATTEMPTS", 2)  # Production uses 3: up to 6 s of backoff.
  with socket.socket() as s:  # A port nobody listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  start = time.monotonic()
  with pytest.raises(StorageError, match=rf"endpoint http://127\.0\.0\.1:{port} is unreachable"):
    open_storage("s3://b/p", endpoint_url=f"http://127.0.0.1:{port}").read_bytes("metadata.yaml")
  assert time.monotonic() - start < 15


def test_s3_transient_error_is_retried(s3_root, monkeypatch):
  storage = open_storage(f"s3://{s3_root}/p")
  storage.write_bytes("a", b"A")
  real, calls = storage.fs.cat_file, []

  def flaky(path, **kwargs):
    calls.append(path)
    if len(calls) == 1:
      raise ConnectionResetError("connection reset by peer")
    return real(path, **kwargs)

  monkeypatch.setattr(storage.fs, "cat_file", flaky)
  monkeypatch.setattr(storage_lib, "RETRY_BASE_DELAY_S", 0.01)
  assert storage.read_bytes("a") == b"A" and len(calls) == 2


def test_s3_pickle_drops_client_and_recreates_it(s3_root):
  storage = open_storage(f"s3://{s3_root}/p")
  _fill(storage)
  assert storage.fs is not None
  blob = pickle.dumps(storage)
  assert b"S3FileSystem" not in blob and b"testsecret" not in blob
  clone = pickle.loads(blob)
  assert clone._fs is None
  assert clone.read_bytes("images/a.jpg") == b"A" and clone._fs is not None


def _read_in_child(storage, parent_fs_id, queue):
  try:
    queue.put((storage.read_bytes("images/a.jpg"), id(storage.fs) != parent_fs_id))
  except Exception as e:  # pylint: disable=broad-except
    queue.put(repr(e))


@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # conftest imports JAX; the child never uses it.
def test_s3_forked_child_gets_its_own_client(s3_root):
  storage = open_storage(f"s3://{s3_root}/p")
  _fill(storage)  # The parent's client (and its event-loop thread) exist before the fork.
  parent_fs = storage.fs
  ctx = multiprocessing.get_context("fork")
  queue = ctx.Queue()
  child = ctx.Process(target=_read_in_child, args=(storage, id(parent_fs), queue))
  child.start()
  result = queue.get(timeout=30)
  child.join(timeout=30)
  assert result == (b"A", True), result
  assert storage.fs is parent_fs  # The parent keeps its own.
