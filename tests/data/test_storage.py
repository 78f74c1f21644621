"""Storage over a local folder and a real S3-compatible server (SeaweedFS, tests/s3_server.py)."""

import logging
import multiprocessing
import os
import pickle
import socket
import threading
import time

import pytest

from panoptic_jax.data import storage as storage_lib
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.storage import LocalStorage, S3Storage, StorageError, open_storage
from tests import s3_server

FILES = {"metadata.yaml": b"task: x\n", "images/b.jpg": b"B", "images/a.jpg": b"A", "images/sub/c.jpg": b"C",
         "panoptic_maps/a.tif": b"TA"}


@pytest.fixture(autouse=True)
def default_retry_budget(monkeypatch):
  """Every test starts from the default budget, whatever the environment says; set_retry_budget is undone after."""
  monkeypatch.delenv(storage_lib.RETRY_BUDGET_ENV, raising=False)


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
  assert storage.list_folders("images") == ["sub"] and storage.list_folders() == ["images", "panoptic_maps"]
  assert storage.list_folders("images/sub") == [] and storage.list_folders("nothing_here") == []
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
  with pytest.raises(StorageError, match="ftp://b/p: unsupported location"):
    open_storage("ftp://b/p")


# ----------------------------------------------------------------------------------------------------------------------
# Retries (no server needed)


class FakeTime:
  """A clock that advances only when sleep is called (sleeps are recorded)."""

  def __init__(self):
    self.now = 100.0
    self.sleeps = []

  def clock(self) -> float:
    return self.now

  def sleep(self, seconds: float) -> None:
    self.sleeps.append(seconds)
    self.now += seconds


def _always(error):
  def fn():
    raise error
  return fn


def _retry(fn, clock, **kwargs):
  return storage_lib.retry_transient(fn, sleep=clock.sleep, clock=clock.clock, **kwargs)


def test_retry_transient_backs_off_logs_each_retry_and_the_recovery(caplog):
  fake, calls = FakeTime(), []

  def flaky():
    calls.append(1)
    if len(calls) < 3:
      raise ConnectionResetError("reset by peer")
    return "ok"

  with caplog.at_level(logging.WARNING):
    assert _retry(flaky, fake, what="read s3://bkt/p/a.jpg (endpoint http://x)", budget_s=60) == "ok"
  assert len(calls) == 3 and len(fake.sleeps) == 2
  assert fake.sleeps[0] <= storage_lib.RETRY_BASE_DELAY_S and fake.sleeps[1] <= 2 * storage_lib.RETRY_BASE_DELAY_S
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(messages) == 3, messages
  for attempt, message in enumerate(messages[:2], 1):
    assert message.startswith("storage: read s3://bkt/p/a.jpg (endpoint http://x) failed")
    assert f"attempt {attempt};" in message and "retry budget of 60 s" in message
    assert "ConnectionResetError: reset by peer" in message
  assert "succeeded at attempt 3" in messages[2]


def test_retry_transient_backs_off_exponentially_up_to_the_cap_until_the_budget_is_spent(monkeypatch):
  monkeypatch.setattr(storage_lib.random, "uniform", lambda low, high: high)  # The longest wait full jitter allows.
  fake = FakeTime()
  error = ConnectionRefusedError(111, "Connection refused")
  with pytest.raises(storage_lib.RetriesExhausted) as e:
    _retry(_always(error), fake, budget_s=60, base_delay_s=0.5, max_delay_s=10)
  assert fake.sleeps[:6] == [0.5, 1, 2, 4, 8, 10] and max(fake.sleeps) == 10
  assert sum(fake.sleeps) == pytest.approx(60)  # The last wait ends at the budget, then one more attempt.
  assert e.value.error is error and e.value.__cause__ is error
  assert e.value.attempts == len(fake.sleeps) + 1 and e.value.budget_s == 60 and not e.value.first_contact
  assert e.value.elapsed_s == pytest.approx(60)


def test_retry_transient_passes_permanent_errors_through_at_once():
  for error in (FileNotFoundError("gone"), PermissionError("denied"), ValueError("bug")):
    fake = FakeTime()
    with pytest.raises(type(error)):
      _retry(_always(error), fake, budget_s=60)
    assert not fake.sleeps


def test_retry_transient_gives_an_endpoint_that_never_answered_only_a_few_seconds():
  endpoint = f"http://never-answered-{time.monotonic_ns()}.invalid"
  fake = FakeTime()
  with pytest.raises(storage_lib.RetriesExhausted) as e:
    _retry(_always(ConnectionRefusedError()), fake, endpoint=endpoint, budget_s=300)
  assert e.value.first_contact and e.value.budget_s == storage_lib.FIRST_CONTACT_BUDGET_S
  assert sum(fake.sleeps) == pytest.approx(storage_lib.FIRST_CONTACT_BUDGET_S)
  # Once it has answered, the whole budget applies to it.
  assert _retry(lambda: "ok", fake, endpoint=endpoint, budget_s=300) == "ok"
  fake = FakeTime()
  with pytest.raises(storage_lib.RetriesExhausted) as e:
    _retry(_always(ConnectionRefusedError()), fake, endpoint=endpoint, budget_s=300)
  assert not e.value.first_contact and sum(fake.sleeps) == pytest.approx(300)


def test_an_error_response_counts_as_an_answer_of_the_endpoint():
  from botocore.exceptions import ClientError
  endpoint = f"http://answered-with-503-{time.monotonic_ns()}.invalid"
  calls = []

  def unavailable_then_refused():
    calls.append(1)
    if len(calls) == 1:
      raise ClientError({"Error": {"Code": "ServiceUnavailable"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "Get")
    raise ConnectionRefusedError()

  fake = FakeTime()
  with pytest.raises(storage_lib.RetriesExhausted) as e:
    _retry(unavailable_then_refused, fake, endpoint=endpoint, budget_s=60)
  assert not e.value.first_contact and sum(fake.sleeps) == pytest.approx(60)


def test_retry_recognises_transient_and_permanent_failures():
  from botocore import exceptions as boto

  def translated(code, status):
    error = OSError(5, "server says no")
    error.__cause__ = boto.ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                                       "GetObject")
    return error

  transient = [translated("SlowDown", 503), translated("InternalError", 500), ConnectionRefusedError(),
               ConnectionResetError(), TimeoutError(), boto.EndpointConnectionError(endpoint_url="http://x"),
               boto.ConnectTimeoutError(endpoint_url="http://x"), boto.ReadTimeoutError(endpoint_url="http://x"),
               boto.ConnectionClosedError(endpoint_url="http://x"), boto.ResponseStreamingError(error="truncated")]
  permanent = [translated("AccessDenied", 403), FileNotFoundError(), PermissionError(), boto.NoCredentialsError(),
               boto.SSLError(endpoint_url="http://x", error="certificate verify failed"), ValueError()]
  assert [e for e in transient if not storage_lib._is_transient(e)] == []
  assert [e for e in permanent if storage_lib._is_transient(e)] == []


def test_retry_budget_is_set_by_function_or_environment(monkeypatch):
  assert storage_lib.retry_budget() == storage_lib.DEFAULT_RETRY_BUDGET_S == 300
  storage_lib.set_retry_budget(42)
  assert storage_lib.retry_budget() == 42 and os.environ[storage_lib.RETRY_BUDGET_ENV] == "42.0"
  storage_lib.set_retry_budget(None)
  assert storage_lib.retry_budget() == 300 and storage_lib.RETRY_BUDGET_ENV not in os.environ
  monkeypatch.setenv("PANOPTIC_JAX_STORAGE_RETRY_S", "7.5")
  assert storage_lib.retry_budget() == 7.5
  for bad in (-1, float("nan"), float("inf"), "soon"):
    with pytest.raises(ValueError, match=rf"set_retry_budget: expected a number of seconds >= 0 .*found {bad!r}"):
      storage_lib.set_retry_budget(bad)
  monkeypatch.setenv("PANOPTIC_JAX_STORAGE_RETRY_S", "5 min")
  with pytest.raises(ValueError, match="environment variable PANOPTIC_JAX_STORAGE_RETRY_S: expected a number of "
                                       "seconds >= 0 .*found '5 min'"):
    open_storage("s3://bkt/p", endpoint_url="http://127.0.0.1:9").read_bytes("a")


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
  storage = open_storage(f"s3://{s3_root}/p")
  assert storage.list_files("images") == ["a.jpg"] and storage.list_folders() == ["images"]
  assert storage.list_folders("images") == []


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


@pytest.mark.slow
def test_s3_endpoint_that_never_answered_fails_fast(s3_env):
  with socket.socket() as s:  # A port nobody listens on.
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  storage = open_storage("s3://bkt/p", endpoint_url=f"http://127.0.0.1:{port}")
  assert storage.retry_budget_s() == storage_lib.FIRST_CONTACT_BUDGET_S  # Not the default 300 s.
  start = time.monotonic()
  with pytest.raises(StorageError, match=rf"endpoint http://127\.0\.0\.1:{port} is unreachable: it has not answered "
                                         r"since this process started \(\d+ attempts over [\d.]+ s.*check the endpoint "
                                         "URL") as e:
    storage.read_bytes("metadata.yaml")
  assert time.monotonic() - start < 30  # Seconds, not the 300 s budget.
  assert "bucket 'bkt', prefix 'p'" in str(e.value) and "EndpointConnectionError" in str(e.value)


@pytest.mark.slow
def test_s3_stops_with_a_clear_error_once_the_budget_is_spent(s3_own_server):
  storage_lib.set_retry_budget(3)
  bucket = s3_own_server.make_bucket()
  storage = open_storage(f"s3://{bucket}/ds")
  storage.write_bytes("a.jpg", b"A")  # The endpoint has answered: the whole budget applies from now on.
  s3_server.kill_server(s3_own_server)
  start = time.monotonic()
  with pytest.raises(StorageError, match=r"found the endpoint http://\S+ unreachable for 3 s \(\d+ attempts\), the "
                                         "whole retry budget of 3 s; .*PANOPTIC_JAX_STORAGE_RETRY_S=<seconds> or "
                                         r"storage.set_retry_budget\(seconds\)") as e:
    storage.read_bytes("a.jpg")
  assert time.monotonic() - start < 30  # It stops; one attempt is bounded by the connect timeout.
  _assert_names_location(str(e.value), s3_own_server, f"{bucket}/ds")
  with pytest.raises(StorageError, match="the whole retry budget of 3 s"):
    storage.read_many(["a.jpg", "b.jpg"])


CONTENTS = {f"images/{i:03d}.jpg": bytes([i]) * (1000 + i) for i in range(6)}


def _wait_for(condition, what: str, timeout_s: float = 120) -> None:
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("outage_s", [5])  # 30 s: tests/training/test_storage_outage.py, under a training run.
def test_s3_reads_survive_the_server_being_killed_and_restarted(s3_own_server, caplog, outage_s):
  bucket = s3_own_server.make_bucket()
  storage = open_storage(f"s3://{bucket}/ds")
  for relpath, data in CONTENTS.items():
    storage.write_bytes(relpath, data)
  names = sorted(CONTENTS)
  rounds, failures, stop = [], [], threading.Event()

  def read_until_stopped():  # As a dataset reader does: single objects, batches, listings, look-ups.
    i = 0
    while not stop.is_set():
      name, batch = names[i % len(names)], names[i % 2::2]
      started = time.monotonic()
      try:
        correct = (storage.read_bytes(name) == CONTENTS[name]
                   and storage.read_many(batch) == [CONTENTS[n] for n in batch]
                   and storage.list_files("images") == [n.removeprefix("images/") for n in names]
                   and storage.exists(name))
      except Exception as e:  # pylint: disable=broad-except
        failures.append(e)
        return
      rounds.append((started, time.monotonic(), correct))
      i += 1

  caplog.set_level(logging.WARNING)
  reader = threading.Thread(target=read_until_stopped, daemon=True)
  reader.start()
  try:
    _wait_for(lambda: len(rounds) >= 3 or failures, "reads before the outage")
    s3_server.kill_server(s3_own_server)
    time.sleep(outage_s)
    s3_server.restart_server(s3_own_server)  # From this thread: the server must outlive the thread that starts it.
    restarted = time.monotonic()
    _wait_for(lambda: failures or any(started > restarted for started, _, _ in rounds), "reads after the restart")
  finally:
    stop.set()
    reader.join(timeout=120)
  assert not failures, failures
  assert all(correct for _, _, correct in rounds)
  assert any(started < restarted < finished for started, finished, _ in rounds)  # One round waited for the server.
  messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  retries = [m for m in messages if "retrying in" in m]
  assert retries, messages
  for message in retries:
    assert f"(endpoint {s3_own_server.endpoint_url}, bucket {bucket!r}, prefix 'ds') failed (attempt" in message
    assert "retry budget of 300 s" in message and s3_own_server.secret_key not in message
  assert any("succeeded at attempt" in m for m in messages)


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


def test_s3_spawned_worker_gets_the_budget_and_waits_for_an_endpoint_that_answered(s3_root):
  storage = open_storage(f"s3://{s3_root}/p")
  storage.write_bytes("a", b"A")  # The endpoint has answered in this process.
  storage_lib.set_retry_budget(123)
  with multiprocessing.get_context("spawn").Pool(1) as pool:  # As Grain starts its workers.
    # Neither the default 300 s nor the few seconds for an endpoint that never answered.
    assert pool.apply(S3Storage.retry_budget_s, (storage,)) == 123
