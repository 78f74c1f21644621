"""One small interface over a local folder, an S3-compatible bucket and a Google Cloud Storage bucket.

A location is a folder path (optionally `file://...`), `s3://bucket/prefix` or `gs://bucket/prefix`. For S3 the
endpoint is the `endpoint_url` argument, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else what botocore resolves
(a profile's `endpoint_url`, or AWS itself). Credentials come only from the standard AWS chain (environment, shared
credentials and config files / `AWS_PROFILE`, ...): they are never taken from dataset files, never stored on a Storage
object, never pickled and never written into messages. GCS works the same way through gcsfs (the optional packages of
requirements-gcs.txt): the endpoint is `endpoint_url`, else `STORAGE_EMULATOR_HOST`, else Google's; credentials come
from Google's standard chain (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's application-default login, the machine's
service account). Both are the same code (BucketStorage) with their own client and error classification.

    storage = open_storage("s3://bucket/coco/val", endpoint_url="http://127.0.0.1:9000")
    storage.list_files("images")             # ['000.jpg', '001.jpg', ...]: files directly inside, sorted
    data = storage.read_bytes("metadata.yaml")
    blobs = storage.read_many(["images/000.jpg", "panoptic_maps/000.tif"])

Transient failures are retried for a time budget rather than a fixed number of attempts: refused, reset or timed-out
connections, an endpoint that does not answer, HTTP 5xx, throttling and bodies that break off. The waits grow
exponentially with full jitter (RETRY_BASE_DELAY_S doubling up to RETRY_MAX_DELAY_S) until the budget is spent:
DEFAULT_RETRY_BUDGET_S (300 s), or the environment variable PANOPTIC_JAX_STORAGE_RETRY_S (seconds), or
`set_retry_budget(seconds)`, which sets that variable so that worker processes started afterwards (spawned or forked)
use the same budget. Each retry is logged as a warning naming the location, the error, the attempt and the time spent
of the budget; a recovery after retries is logged once. When the budget is spent, StorageError says for how long the
endpoint failed and how to raise the budget.
An endpoint that has never answered in this process gets only FIRST_CONTACT_BUDGET_S (5 s, at most the budget), so
that a mistyped endpoint stops a run within seconds at start-up, while a server that answered once and then restarts
is waited for. A Storage object pickled to a worker process carries whether its endpoint had answered.
One attempt is bounded by the clients' connect and read timeouts (CONNECT_TIMEOUT_S, READ_TIMEOUT_S): a server that
is stopped rather than killed accepts connections but never answers. botocore's, s3fs's and gcsfs's own retry loops
are switched off (s3fs's retries every exception five times without waiting, gcsfs's six times), so that every retry
is logged and counted here.
Permanent failures (missing bucket or object, no or wrong credentials, access denied, TLS errors) raise `StorageError`
at once; its message names the location (endpoint, bucket, prefix), the object, what was expected and what was found.

Storage objects are cheap to create, picklable, and build their s3fs / gcsfs client lazily once per process, so they
can be handed to Grain worker processes (spawned or forked).
"""

import errno
import functools
import hashlib
import importlib.util
import logging
import math
import os
import pathlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from panoptic_jax.errors import UserError

T = TypeVar("T")

# Retries of transient failures (see the module docstring); delays in seconds.
DEFAULT_RETRY_BUDGET_S = 300.0
FIRST_CONTACT_BUDGET_S = 5.0
RETRY_BUDGET_ENV = "PANOPTIC_JAX_STORAGE_RETRY_S"
RETRY_BASE_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 10.0
# One attempt: botocore's own retry loop is off (1 attempt in all), so that every retry goes through retry_transient.
BOTO_MAX_ATTEMPTS = 1
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 20.0  # Seconds without a byte from the server, not for a whole transfer.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
    "408", "429",
})


class StorageError(UserError, OSError):
  """A permanent storage failure; the message names the location, the object, and what went wrong.

  Attributes:
    location: `Storage.describe()` of the storage that failed.
    relpath: the object (relative to the location) the operation was about, or "" for the location itself.
  """

  def __init__(self, message: str, location: str = "", relpath: str = ""):
    super().__init__(message)
    self.location = location
    self.relpath = relpath

  def __str__(self) -> str:
    return self.args[0]


class Storage:
  """A dataset location: read, write and list files by path relative to the location (with '/' separators)."""

  def read_bytes(self, relpath: str) -> bytes:
    """The whole file; StorageError if it is missing or unreadable."""
    raise NotImplementedError

  def read_many(self, relpaths: Sequence[str]) -> list[bytes]:
    """Several whole files, in order (batched: one round of concurrent requests on S3)."""
    return [self.read_bytes(p) for p in relpaths]

  def write_bytes(self, relpath: str, data: bytes) -> None:
    """Creates or replaces a file (parent folders are created as needed)."""
    raise NotImplementedError

  def delete(self, relpath: str) -> None:
    """Removes a file; nothing happens when it does not exist."""
    raise NotImplementedError

  def exists(self, relpath: str) -> bool:
    """Whether the file exists; StorageError when the location itself cannot be reached or read."""
    raise NotImplementedError

  def list_files(self, relpath: str = "") -> list[str]:
    """Names of the files directly inside the folder `relpath` (no recursion, no folders), sorted.

    A folder that does not exist lists as empty (object stores have no empty folders to tell the two apart).
    """
    raise NotImplementedError

  def list_folders(self, relpath: str = "") -> list[str]:
    """Names of the folders directly inside the folder `relpath`, sorted; empty when it does not exist."""
    raise NotImplementedError

  def describe(self) -> str:
    """The location for messages, e.g. 's3://bucket/prefix at http://127.0.0.1:9000'; never credentials."""
    raise NotImplementedError

  def url(self, relpath: str = "") -> str:
    """The full name of a file for messages, e.g. 's3://bucket/prefix/images/000.jpg' or '/data/images/000.jpg'."""
    raise NotImplementedError

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.describe()!r})"


def open_storage(location: "str | os.PathLike[str] | Storage", endpoint_url: str | None = None) -> Storage:
  """Opens a folder path, `file://` URL, `s3://bucket/prefix` or `gs://bucket/prefix` (no I/O until the first call)."""
  if isinstance(location, Storage):
    return location
  location = os.fspath(location)
  if location.startswith("s3://"):
    return S3Storage(location, endpoint_url)
  if location.startswith("gs://"):
    return GCSStorage(location, endpoint_url)
  if "://" in location and not location.startswith("file://"):
    raise StorageError(f"{location}: unsupported location; expected a folder path, file://, s3://bucket/prefix or "
                       "gs://bucket/prefix", location)
  return LocalStorage(location.removeprefix("file://"))


def open_file(location: "str | os.PathLike[str]", endpoint_url: str | None = None) -> tuple[Storage, str]:
  """The storage of a single file's folder and the file's name: `open_file("s3://b/x/metrics.json")` is
  (the storage of s3://b/x, "metrics.json"); a bare file name is in the current folder."""
  folder, _, name = os.fspath(location).rpartition("/")
  return open_storage(folder or ".", endpoint_url), name


def _clean_relpath(relpath: str, where: str) -> str:
  parts = [p for p in str(relpath).replace("\\", "/").split("/") if p not in ("", ".")]
  if ".." in parts:
    raise StorageError(f"{where}: path {relpath!r} leaves the dataset location ('..' is not allowed)", where, relpath)
  return "/".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# Local folders


class LocalStorage(Storage):
  """A folder on a local (or mounted network) file system."""

  def __init__(self, root: "str | os.PathLike[str]"):
    self.root = pathlib.Path(root).expanduser().absolute()

  def describe(self) -> str:
    return str(self.root)

  def url(self, relpath: str = "") -> str:
    relpath = _clean_relpath(relpath, self.describe())
    return str(self.root / relpath) if relpath else str(self.root)

  def _path(self, relpath: str) -> pathlib.Path:
    relpath = _clean_relpath(relpath, self.describe())
    return self.root / relpath if relpath else self.root

  def _error(self, action: str, relpath: str, e: OSError, expected: str) -> StorageError:
    if isinstance(e, FileNotFoundError) and not self.root.is_dir():
      found = "the dataset folder itself does not exist" if not self.root.exists() else "it is not a folder"
      message = f"{self.describe()}: cannot {action} {relpath!r}: {found}"
    else:
      found = {FileNotFoundError: "nothing there", IsADirectoryError: "a folder", NotADirectoryError:
               "a file where a folder was expected", PermissionError: "permission denied"}.get(
                   type(e), f"{type(e).__name__}: {e.strerror or e}")
      message = f"cannot {action} {self.url(relpath)}: expected {expected}, found {found}"
    return StorageError(message, self.describe(), relpath)

  def read_bytes(self, relpath: str) -> bytes:
    try:
      return self._path(relpath).read_bytes()
    except OSError as e:
      raise self._error("read", relpath, e, "a readable file") from None

  def write_bytes(self, relpath: str, data: bytes) -> None:
    path = self._path(relpath)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp.write_bytes(data)
      os.replace(tmp, path)  # Readers never see a half-written file.
    except OSError as e:
      tmp.unlink(missing_ok=True)
      raise self._error("write", relpath, e, "a writable location") from None

  def symlink(self, relpath: str, target: "str | os.PathLike[str]") -> None:
    """Creates or replaces `relpath` as a symbolic link to the absolute path `target`."""
    path = self._path(relpath)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp.unlink(missing_ok=True)
      os.symlink(os.path.abspath(target), tmp)
      os.replace(tmp, path)  # Replaces an earlier file or link in one step.
    except OSError as e:
      tmp.unlink(missing_ok=True)
      raise self._error("write", relpath, e, "a location where links can be created") from None

  def delete(self, relpath: str) -> None:
    try:
      self._path(relpath).unlink(missing_ok=True)
    except OSError as e:
      raise self._error("delete", relpath, e, "a writable location") from None

  def exists(self, relpath: str) -> bool:
    return self._path(relpath).is_file()

  def list_files(self, relpath: str = "") -> list[str]:
    return self._list(relpath, folders=False)

  def list_folders(self, relpath: str = "") -> list[str]:
    return self._list(relpath, folders=True)

  def _list(self, relpath: str, folders: bool) -> list[str]:
    folder = self._path(relpath)
    try:
      with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if (e.is_dir() if folders else e.is_file()))
    except FileNotFoundError:
      return []
    except OSError as e:
      raise self._error("list", relpath, e, "a readable folder") from None


# ----------------------------------------------------------------------------------------------------------------------
# Object stores (S3-compatible and GCS), through fsspec: what is common is in BucketStorage


def _client_error_code(e: BaseException) -> str | None:
  """The S3 error code (or HTTP status) behind an s3fs / botocore exception, if any."""
  for err in (e, e.__cause__, e.__context__):
    response = getattr(err, "response", None)
    if isinstance(response, dict):
      code = response.get("Error", {}).get("Code")
      status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
      return str(code or status)
  return None


def _gcs_status(e: BaseException) -> str | None:
  """The HTTP status of a GCS JSON-API error response behind a gcsfs exception, if any."""
  from gcsfs.retry import HttpError  # pylint: disable=g-import-not-at-top
  for err in (e, e.__cause__, e.__context__):
    if isinstance(err, HttpError) and err.code is not None:
      return str(err.code)
  return None


def _is_gcs_forbidden(e: BaseException) -> bool:
  """gcsfs turns HTTP 403 into a plain OSError("Forbidden: <url> ...")."""
  return isinstance(e, OSError) and str(e).startswith("Forbidden")


def _is_transient_given(e: BaseException, permanent: tuple[type, ...], transient: tuple[type, ...],
                        code: str | None) -> bool:
  """The rules common to every store, with one library's permanent and transient exception types and the error code
  (or HTTP status) that its server answered with."""
  if isinstance(e, RetriesExhausted):
    return False  # Already retried for a whole budget.
  if isinstance(e, (PermissionError, FileNotFoundError, *permanent)):
    return False  # A certificate, credential, permission or missing-object problem does not cure itself.
  if isinstance(e, (ConnectionError, TimeoutError, *transient)):
    return True  # Refused / reset / aborted connections, unreachable endpoints, connect and read timeouts.
  if code in _TRANSIENT_CODES:
    return True
  return isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE)


def _is_transient(e: BaseException) -> bool:
  """S3 failures that another attempt may cure: refused or dropped connections, timeouts, 5xx, throttling."""
  import aiohttp  # pylint: disable=g-import-not-at-top
  from botocore import exceptions as boto_exceptions  # pylint: disable=g-import-not-at-top
  from s3fs.core import S3_RETRYABLE_ERRORS  # pylint: disable=g-import-not-at-top  (timeouts, truncated bodies)
  return _is_transient_given(
      e, (boto_exceptions.SSLError, boto_exceptions.NoCredentialsError, boto_exceptions.PartialCredentialsError),
      (boto_exceptions.ConnectionError, boto_exceptions.HTTPClientError, *S3_RETRYABLE_ERRORS,
       aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError),
      _client_error_code(e))


def _is_transient_gcs(e: BaseException) -> bool:
  """GCS failures that another attempt may cure: as for S3 (HTTP 408, 429 and 5xx among the answers)."""
  import aiohttp  # pylint: disable=g-import-not-at-top
  import google.auth.exceptions  # pylint: disable=g-import-not-at-top
  import requests.exceptions  # pylint: disable=g-import-not-at-top  (google-auth's token requests)
  from fsspec.exceptions import FSTimeoutError  # pylint: disable=g-import-not-at-top
  from gcsfs.retry import ChecksumError  # pylint: disable=g-import-not-at-top
  if isinstance(e, google.auth.exceptions.RefreshError) and not getattr(e, "retryable", False):
    return False  # Credentials that the token endpoint refused.
  return _is_transient_given(
      e, (aiohttp.ClientSSLError, requests.exceptions.SSLError, google.auth.exceptions.DefaultCredentialsError),
      (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, FSTimeoutError, ChecksumError,
       google.auth.exceptions.TransportError, google.auth.exceptions.RefreshError,
       requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError),
      _gcs_status(e))


def _answered(e: BaseException) -> bool:
  """Whether an S3 failure carries an answer of the server (an HTTP error response), not a connection problem."""
  return _client_error_code(e) is not None or isinstance(e, (FileNotFoundError, PermissionError))


def _answered_gcs(e: BaseException) -> bool:
  """Whether a GCS failure carries an answer of the server (an HTTP error response), not a connection problem."""
  return _gcs_status(e) is not None or isinstance(e, (FileNotFoundError, PermissionError)) or _is_gcs_forbidden(e)


class RetriesExhausted(OSError):
  """A transient failure that persisted for the whole retry budget.

  Attributes:
    error: the last failure (also the exception's __cause__).
    attempts: attempts made.
    elapsed_s: seconds from the first attempt to the last failure.
    budget_s: the budget that was spent.
    first_contact: whether the endpoint had never answered in this process (the short first-contact budget applied).
  """

  def __init__(self, error: BaseException, attempts: int, elapsed_s: float, budget_s: float, first_contact: bool):
    super().__init__(f"{type(error).__name__}: {error} (still failing after {attempts} attempts over "
                     f"{elapsed_s:.1f} s; retry budget {budget_s:g} s)")
    self.error = error
    self.attempts = attempts
    self.elapsed_s = elapsed_s
    self.budget_s = budget_s
    self.first_contact = first_contact

  def __str__(self) -> str:
    return self.args[0]


def retry_budget() -> float:
  """Seconds for which transient failures are retried: PANOPTIC_JAX_STORAGE_RETRY_S if set, else the default.

  Raises:
    ValueError: the environment variable is not a number of seconds >= 0.
  """
  text = os.environ.get(RETRY_BUDGET_ENV, "").strip()
  if not text:
    return DEFAULT_RETRY_BUDGET_S
  try:
    seconds = float(text)
  except ValueError:
    seconds = math.nan
  if not (math.isfinite(seconds) and seconds >= 0):
    raise ValueError(f"environment variable {RETRY_BUDGET_ENV}: expected a number of seconds >= 0 (how long "
                     f"transient storage failures are retried), found {text!r}")
  return seconds


def set_retry_budget(seconds: float | None) -> None:
  """Sets for how long transient failures are retried, in this process and in the worker processes it starts later.

  The value is stored in the environment variable PANOPTIC_JAX_STORAGE_RETRY_S, which spawned and forked processes
  inherit; it applies to every storage call that starts afterwards, including those of Storage objects opened before.

  Args:
    seconds: the budget in seconds (>= 0; 0 fails at the first transient error), or None for DEFAULT_RETRY_BUDGET_S.

  Raises:
    ValueError: seconds is negative, infinite or not a number.
  """
  if seconds is None:
    os.environ.pop(RETRY_BUDGET_ENV, None)
    return
  try:
    value = float(seconds)
  except (TypeError, ValueError):
    value = math.nan
  if not (math.isfinite(value) and value >= 0):
    raise ValueError(f"set_retry_budget: expected a number of seconds >= 0 (or None for the default "
                     f"{DEFAULT_RETRY_BUDGET_S:g} s), found {seconds!r}")
  os.environ[RETRY_BUDGET_ENV] = repr(value)


# Endpoints that have answered a request in this process (a fork inherits them; a pickled S3Storage carries its own).
_answered_endpoints: set[str] = set()


def _budget_for(endpoint: str | None, budget_s: float) -> tuple[float, bool]:
  """(seconds to spend on transient failures, whether the short first-contact budget applies)."""
  if endpoint is not None and endpoint not in _answered_endpoints:
    return min(budget_s, FIRST_CONTACT_BUDGET_S), True
  return budget_s, False


def retry_transient(fn: Callable[[], T], what: str = "storage call", endpoint: str | None = None,
                    budget_s: float | None = None, base_delay_s: float | None = None,
                    max_delay_s: float | None = None, sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic,
                    is_transient: Callable[[BaseException], bool] = _is_transient,
                    answered: Callable[[BaseException], bool] = _answered) -> T:
  """Calls fn, retrying transient failures with exponential backoff and full jitter until the time budget is spent.

  Args:
    fn: the operation; called again from scratch for each attempt.
    what: the operation and its location, for the log (e.g. "read s3://bucket/a.jpg (endpoint ..., bucket ...)").
    endpoint: the endpoint fn talks to. Until it has answered once in this process, only FIRST_CONTACT_BUDGET_S
      (at most the budget) is spent on it. None: no first-contact rule.
    budget_s: seconds, from the first attempt, during which transient failures are retried (None: `retry_budget()`).
    base_delay_s: the first retry waits up to this long (None: RETRY_BASE_DELAY_S); each further one up to twice as
      long as the one before, up to max_delay_s (None: RETRY_MAX_DELAY_S). The last wait ends at the budget.
    sleep: waits (tests pass a fake one, with a matching clock).
    clock: monotonic seconds.
    is_transient: which failures are retried (the default classifies S3's / botocore's errors; GCS has its own).
    answered: which failures carry an answer of the endpoint (an HTTP error response), so that it has answered.

  Returns:
    What fn returned.

  Raises:
    RetriesExhausted: a transient failure persisted for the whole budget; the last one is its `error`.
    Exception: any other failure of fn, at once.
  """
  budget_s = retry_budget() if budget_s is None else budget_s
  base_delay_s = RETRY_BASE_DELAY_S if base_delay_s is None else base_delay_s
  max_delay_s = RETRY_MAX_DELAY_S if max_delay_s is None else max_delay_s
  start = clock()
  attempt = 0
  while True:
    attempt += 1
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      if endpoint is not None and answered(e):
        _answered_endpoints.add(endpoint)
      if not is_transient(e):
        raise
      elapsed = clock() - start
      allowed, first_contact = _budget_for(endpoint, budget_s)
      if elapsed >= allowed:
        raise RetriesExhausted(e, attempt, elapsed, allowed, first_contact) from e
      delay = min(random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1))), allowed - elapsed)
      kind = "first-contact budget (the endpoint has not answered yet)" if first_contact else "retry budget"
      logging.warning("storage: %s failed (attempt %d; %.1f s spent of the %s of %g s), retrying in %.1f s: %s",
                      what, attempt, elapsed, kind, allowed, delay, _scrub(f"{type(e).__name__}: {e}"))
      sleep(delay)
    else:
      if endpoint is not None:
        _answered_endpoints.add(endpoint)
      if attempt > 1:
        logging.warning("storage: %s succeeded at attempt %d, %.1f s after the first one", what, attempt,
                        clock() - start)
      return result


class BucketStorage(Storage):
  """`<scheme>://bucket/prefix` through an fsspec filesystem, one client per process built lazily (subclasses give the
  scheme, the client, the error classification and the wording of credential problems)."""

  scheme: str  # "s3" or "gs".
  default_endpoint: str  # Where requests go without an endpoint, for messages.
  endpoint_settings: str  # Where the endpoint is set, for messages.
  is_transient: Callable[[BaseException], bool]  # Failures worth another attempt (see retry_transient).
  answered: Callable[[BaseException], bool]  # Failures that are an answer of the endpoint.

  def __init__(self, location: str, endpoint_url: str | None = None):
    rest = location.removeprefix(f"{self.scheme}://").strip("/")
    self.bucket, _, prefix = rest.partition("/")
    self.prefix = prefix.strip("/")
    if not self.bucket:
      raise StorageError(f"{location}: expected {self.scheme}://bucket/prefix, found no bucket name", location)
    # The endpoint is fixed when the storage is opened, so that worker processes use the same one.
    self.endpoint_url = endpoint_url or self._endpoint_from_environment()
    self._fs = None
    self._fs_pid = None
    self._bucket_exists = None

  def __getstate__(self):
    state = self.__dict__.copy()
    state.update(_fs=None, _fs_pid=None, _bucket_exists=None, _endpoint_answered=self._endpoint in _answered_endpoints)
    return state

  def __setstate__(self, state):
    # A worker process started while the server is down must wait for it like its parent, not fail fast.
    answered = state.pop("_endpoint_answered", False)
    self.__dict__.update(state)
    if answered:
      _answered_endpoints.add(self._endpoint)

  # -- what differs between stores -------------------------------------------------------------------------------------

  def _endpoint_from_environment(self) -> str | None:
    """The endpoint when none is given, from the environment; None for the store's default."""
    raise NotImplementedError

  def _new_client(self):
    """This process's fsspec filesystem for this endpoint (and credential environment)."""
    raise NotImplementedError

  def _probe(self) -> None:
    """One cheap request about the bucket itself; FileNotFoundError when it does not exist."""
    raise NotImplementedError

  def _credential_problem(self, e: BaseException) -> tuple[str, bool] | None:
    """(what was found, whether the library's own message helps) for a credential or permission failure, else None."""
    raise NotImplementedError

  # -- common ----------------------------------------------------------------------------------------------------------

  @property
  def _endpoint(self) -> str:
    """The key of this storage's endpoint among those that have answered in this process."""
    return f"{self.scheme}:{self.endpoint_url or ''}"

  def retry_budget_s(self) -> float:
    """Seconds a transient failure would be retried now: the retry budget, or less until the endpoint has answered."""
    return _budget_for(self._endpoint, retry_budget())[0]

  def describe(self) -> str:
    where = self.endpoint_url or self.default_endpoint
    location = f"{self.scheme}://{self.bucket}/{self.prefix}" if self.prefix else f"{self.scheme}://{self.bucket}"
    return f"{location} at {where}"

  def _key(self, relpath: str) -> str:
    relpath = _clean_relpath(relpath, self.describe())
    return "/".join(p for p in (self.prefix, relpath) if p)

  def url(self, relpath: str = "") -> str:
    return f"{self.scheme}://{self.bucket}/{self._key(relpath)}"

  def _path(self, relpath: str) -> str:
    return f"{self.bucket}/{self._key(relpath)}"

  @property
  def fs(self):
    """This process's client for this endpoint and credential environment (see `_cached_client`)."""
    pid = os.getpid()
    if self._fs is None or self._fs_pid != pid:
      self._fs = self._new_client()
      self._fs_pid = pid
      self._bucket_exists = None
    return self._fs

  def _probe_bucket(self) -> bool | None:
    """True / False when the bucket's existence could be established, None when the probe itself failed."""
    if self._bucket_exists is None:
      try:
        self._probe()
        self._bucket_exists = True
      except FileNotFoundError:
        self._bucket_exists = False
      except Exception:  # pylint: disable=broad-except  (credentials or network: the caller reports the original)
        return None
    return self._bucket_exists

  def _error(self, action: str, relpath: str, e: BaseException, expected: str) -> StorageError:
    detail = f"{type(e).__name__}: {e}"
    if isinstance(e, FileNotFoundError):
      if self._probe_bucket() is False:
        found = f"bucket {self.bucket!r} does not exist at this endpoint"
      else:
        found = "no such object"
      detail = ""
    elif (credential_problem := self._credential_problem(e)) is not None:
      found, keep_detail = credential_problem
      detail = detail if keep_detail else ""
    elif isinstance(e, RetriesExhausted):
      endpoint = self.endpoint_url or "(default)"
      if e.first_contact:
        found = (f"the endpoint {endpoint} is unreachable: it has not answered since this process started "
                 f"({e.attempts} attempts over {e.elapsed_s:.1f} s; an endpoint that never answered gets "
                 f"{e.budget_s:g} s, not the whole retry budget); check the endpoint URL ({self.endpoint_settings}) "
                 "and that the server is running")
      else:
        state = "failing" if self.answered(e.error) else "unreachable"
        found = (f"the endpoint {endpoint} {state} for {e.elapsed_s:.0f} s ({e.attempts} attempts), the whole retry "
                 f"budget of {e.budget_s:g} s; to wait longer for a server to come back, raise the budget with the "
                 f"environment variable {RETRY_BUDGET_ENV}=<seconds> or storage.set_retry_budget(seconds)")
      detail = f"{type(e.error).__name__}: {e.error}"
    elif self.is_transient(e):
      found = "a transient failure"
    else:
      found = "an error"
    message = f"cannot {action} {self.url(relpath)} ({self._where()}): expected {expected}, found {found}"
    if detail:
      message += f" [{detail}]"
    return StorageError(_scrub(message), self.describe(), relpath)

  def _where(self) -> str:
    return f"endpoint {self.endpoint_url or 'default'}, bucket {self.bucket!r}, prefix {self.prefix!r}"

  def _retry(self, action: str, target: str, fn: Callable[[], T], budget_s: float) -> T:
    """retry_transient for `action` ("read") of `target` (a URL); RetriesExhausted when the budget is spent."""
    return retry_transient(fn, f"{action} {target} ({self._where()})", self._endpoint, budget_s,
                           is_transient=self.is_transient, answered=self.answered)

  def _call(self, action: str, relpath: str, expected: str, fn: Callable[[], T]) -> T:
    budget_s = retry_budget()  # A malformed setting raises its own ValueError, not a storage error.
    try:
      return self._retry(action, self.url(relpath), fn, budget_s)
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(action, relpath, e, expected) from None

  # -- operations ------------------------------------------------------------------------------------------------------

  def read_bytes(self, relpath: str) -> bytes:
    path = self._path(relpath)
    return self._call("read", relpath, "an existing object", lambda: self.fs.cat_file(path))

  def read_many(self, relpaths: Sequence[str]) -> list[bytes]:
    relpaths = list(relpaths)
    if not relpaths:
      return []
    paths = [self._path(p) for p in relpaths]
    relpath_of = dict(zip(paths, relpaths))
    done: dict[str, bytes] = {}
    failed = [relpaths[0]]  # The object the last failure was about, for the error message.

    def fetch_missing() -> None:
      # One retry loop (and one budget) for the whole batch; each attempt fetches what earlier ones did not get.
      todo = [p for p in relpath_of if p not in done]
      results = self.fs.cat(todo, on_error="return")
      errors = []
      for path in todo:
        result = results.get(path)
        if isinstance(result, BaseException):
          errors.append((path, result))
        elif isinstance(result, bytes):
          done[path] = result
        else:  # No result for this path (not expected from s3fs or gcsfs): read it on its own.
          failed[0] = relpath_of[path]
          done[path] = self.fs.cat_file(path)
      if errors:
        path, error = next(((p, e) for p, e in errors if not self.is_transient(e)), errors[0])
        failed[0] = relpath_of[path]
        raise error

    budget_s = retry_budget()
    more = len(relpaths) - 1
    target = self.url(relpaths[0]) + (f" and {more} more object{'s' if more > 1 else ''}" if more else "")
    try:
      self._retry("read", target, fetch_missing, budget_s)
    except Exception as e:  # pylint: disable=broad-except
      raise self._error("read", failed[0], e, "an existing object") from None
    return [done[p] for p in paths]

  def write_bytes(self, relpath: str, data: bytes) -> None:
    path = self._path(relpath)
    self._call("write", relpath, "a writable bucket", lambda: self.fs.pipe_file(path, bytes(data)))

  def delete(self, relpath: str) -> None:
    path = self._path(relpath)
    self._call("delete", relpath, "a writable bucket", lambda: self.fs.rm_file(path) if self.fs.exists(path) else None)

  def exists(self, relpath: str) -> bool:
    path = self._path(relpath)
    budget_s = retry_budget()
    try:
      self._retry("look up", self.url(relpath), lambda: self.fs.info(path), budget_s)
      return True
    except FileNotFoundError as e:
      if self._probe_bucket() is False:
        raise self._error("look up", relpath, e, "an existing bucket") from None
      return False
    except Exception as e:  # pylint: disable=broad-except
      raise self._error("look up", relpath, e, "a reachable bucket") from None

  def list_files(self, relpath: str = "") -> list[str]:
    return self._list(relpath, "file")

  def list_folders(self, relpath: str = "") -> list[str]:
    return self._list(relpath, "directory")

  def _list(self, relpath: str, entry_type: str) -> list[str]:
    """Names of the entries of fsspec type `entry_type` ("file" or "directory", a common prefix) inside `relpath`."""
    key = self._key(relpath)
    folder = f"{self.bucket}/{key}".rstrip("/")
    budget_s = retry_budget()
    try:
      entries = self._retry("list", self.url(relpath) + "/", lambda: self.fs.ls(folder, detail=True, refresh=True),
                            budget_s)
    except FileNotFoundError as e:
      if self._probe_bucket() is False:
        raise self._error("list", relpath, e, "an existing bucket") from None
      return []  # An empty or absent prefix.
    except Exception as e:  # pylint: disable=broad-except
      raise self._error("list", relpath, e, "a listable bucket") from None
    names = []
    for entry in entries:
      if entry.get("type") != entry_type:
        continue
      name = entry["name"].rstrip("/")
      if name == folder:  # A zero-byte "folder marker" object.
        continue
      names.append(name.rsplit("/", 1)[-1])
    return sorted(names)


class S3Storage(BucketStorage):
  """`s3://bucket/prefix` on an S3-compatible endpoint, through s3fs."""

  scheme = "s3"
  default_endpoint = "the default AWS endpoint (or the AWS profile's endpoint_url)"
  endpoint_settings = "--endpoint_url, --config.dataset.endpoint_url or AWS_ENDPOINT_URL_S3"
  is_transient = staticmethod(_is_transient)
  answered = staticmethod(_answered)

  def _endpoint_from_environment(self) -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

  def _new_client(self):
    return _s3_client(self.endpoint_url)

  def _probe(self) -> None:
    self.fs.call_s3("list_objects_v2", Bucket=self.bucket, MaxKeys=1)

  def _credential_problem(self, e: BaseException) -> tuple[str, bool] | None:
    from botocore import exceptions as boto_exceptions  # pylint: disable=g-import-not-at-top
    if isinstance(e, PermissionError):
      return ("access denied: the credentials from the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
              "AWS_PROFILE) were rejected or lack permission", True)
    if isinstance(e, boto_exceptions.NoCredentialsError):
      return ("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile "
              "in ~/.aws/credentials", False)
    if isinstance(e, boto_exceptions.PartialCredentialsError):
      return "incomplete AWS credentials (for example an access key without its secret)", True
    return None


GCS_REQUIREMENTS = "requirements-gcs.txt"


class GCSStorage(BucketStorage):
  """`gs://bucket/prefix` on Google Cloud Storage (or an emulator), through gcsfs and the GCS JSON API.

  The endpoint is the `endpoint_url` argument, else `STORAGE_EMULATOR_HOST` (the variable that gcsfs and
  google-cloud-storage honour), else Google's. Credentials come from Google's standard chain (the key file named by
  `GOOGLE_APPLICATION_CREDENTIALS`, `gcloud auth application-default login`, the VM's service account), with anonymous
  access as gcsfs's last resort: they are never taken from dataset files, stored, pickled or written into messages.
  """

  scheme = "gs"
  default_endpoint = "the Google Cloud Storage API"
  endpoint_settings = "--endpoint_url, --config.dataset.endpoint_url or STORAGE_EMULATOR_HOST"
  is_transient = staticmethod(_is_transient_gcs)
  answered = staticmethod(_answered_gcs)

  def __init__(self, location: str, endpoint_url: str | None = None):
    missing = [name for name in ("gcsfs", "google.cloud.storage") if not _importable(name)]
    if missing:
      raise StorageError(f"{location}: gs:// locations need the optional Google Cloud Storage packages, and "
                         f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                         f"pip install -r {GCS_REQUIREMENTS}", location)
    super().__init__(location, endpoint_url)

  def _endpoint_from_environment(self) -> str | None:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if emulator in ("", "default"):
      return None
    return emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"  # As gcsfs reads it.

  def _new_client(self):
    return _gcs_client(self.endpoint_url)

  def _probe(self) -> None:
    self.fs.call("GET", "b/{}/o", self.bucket, maxResults=1, json_out=True)

  def _credential_problem(self, e: BaseException) -> tuple[str, bool] | None:
    import google.auth.exceptions  # pylint: disable=g-import-not-at-top
    if isinstance(e, PermissionError) or _is_gcs_forbidden(e):
      return ("access denied: the Google credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud auth application-default "
              "login or the machine's service account) were rejected or lack permission on the bucket", False)
    if _gcs_status(e) == "401" or isinstance(e, (google.auth.exceptions.DefaultCredentialsError,
                                                   google.auth.exceptions.RefreshError)):
      return ("no valid Google credentials: set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or run "
              "gcloud auth application-default login", True)
    return None


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ImportError:  # A missing parent package (google.cloud).
    return False


def _scrub(message: str) -> str:
  """Removes the secret key of the environment from a message, should any library ever echo it."""
  for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    secret = os.environ.get(name)
    if secret and len(secret) >= 4:
      message = message.replace(secret, "***")
  return message


# ----------------------------------------------------------------------------------------------------------------------
# fsspec clients: one per process, store, endpoint and credential environment


# Environment variables that change which identity or endpoint a new client gets.
_S3_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                  "AWS_DEFAULT_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION",
                  "AWS_REGION", "AWS_EC2_METADATA_DISABLED", "AWS_CA_BUNDLE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_GCS_CLIENT_ENV = ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST",
                   "GOOGLE_CLOUD_UNIVERSE_DOMAIN", "NO_GCE_CHECK", "GCE_METADATA_HOST", "GCE_METADATA_IP")
_clients: dict = {}
_clients_lock = threading.Lock()
_loader = None


def _forget_clients() -> None:
  """In a forked child: the parent's clients belong to the parent's event-loop thread, which did not survive."""
  global _clients_lock
  _clients.clear()
  _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients)


def _cached_client(scheme: str, endpoint_url: str | None, env_names: Sequence[str], build: Callable[[], T]) -> T:
  """The client of this process for `scheme` with this endpoint and these environment variables, built on first use.

  Never fsspec's own instance cache (it ignores the environment, and a fork copies it); keyed by process id. The
  environment enters the key only as a hash.
  """
  env = "\0".join(os.environ.get(k, "\1") for k in env_names)
  key = (scheme, os.getpid(), endpoint_url, hashlib.sha256(env.encode()).hexdigest())
  with _clients_lock:
    fs = _clients.get(key)
    if fs is None:
      fs = _clients[key] = build()
    return fs


def _s3_client(endpoint_url: str | None):
  """An s3fs client. All share one botocore data loader, so that the S3 service model (a large JSON file) is parsed
  once per process rather than once per client."""

  def build():
    global _loader
    # Imported here: local-only use stays free of botocore / aiohttp imports.
    import aiobotocore.session  # pylint: disable=g-import-not-at-top
    import botocore.loaders  # pylint: disable=g-import-not-at-top
    import s3fs  # pylint: disable=g-import-not-at-top
    if _loader is None:
      _loader = botocore.loaders.create_loader()
    session = aiobotocore.session.AioSession()
    session.register_component("data_loader", _loader)
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint_url,
        session=session,
        skip_instance_cache=True,     # See _cached_client.
        use_listings_cache=False,     # Listings must reflect the bucket now, not an earlier call.
        max_concurrency=1,            # Whole-object GETs without a HEAD first.
        config_kwargs={"retries": {"total_max_attempts": BOTO_MAX_ATTEMPTS, "mode": "standard"},
                       "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S})
    fs.retries = 1  # s3fs's own loop retries any exception 5 times without waiting; ours is retry_transient.
    return fs

  return _cached_client("s3", endpoint_url, _S3_CLIENT_ENV, build)


@functools.cache
def _one_attempt_gcsfs():
  """gcsfs's JSON-API filesystem, each request made once.

  gcsfs's request method is wrapped in its own retry loop (6 attempts over about 30 s, fixed when the class is
  defined), which would hide retries from retry_transient's log and budget and stretch the first-contact budget of a
  mistyped endpoint; the subclass calls the unwrapped method. It is gcsfs's core filesystem, not the
  ExtendedGcsFileSystem that `gcsfs.GCSFileSystem` names by default: that one first asks the gRPC storage-control API
  for each bucket's layout (zonal or hierarchical namespace), which whole-object reads, writes and listings do not
  need.
  """
  import gcsfs.core  # pylint: disable=g-import-not-at-top

  class OneAttemptGCSFileSystem(gcsfs.core.GCSFileSystem):

    async def _request(self, *args, **kwargs):
      return await gcsfs.core.GCSFileSystem._request.__wrapped__(self, *args, **kwargs)  # pylint: disable=no-member

  return OneAttemptGCSFileSystem


def _gcs_client(endpoint_url: str | None):
  """A gcsfs client with Google's default credential chain, bounded connect and read timeouts and no retries."""

  def build():
    import aiohttp  # pylint: disable=g-import-not-at-top
    return _one_attempt_gcsfs()(
        endpoint_url=endpoint_url,
        skip_instance_cache=True,     # See _cached_client.
        use_listings_cache=False,     # Listings must reflect the bucket now, not an earlier call.
        requests_timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S))

  return _cached_client("gs", endpoint_url, _GCS_CLIENT_ENV, build)
