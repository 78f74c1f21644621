"""One small interface over a local folder and an S3-compatible bucket.

A location is a folder path (optionally `file://...`) or `s3://bucket/prefix`. For S3 the endpoint is the
`endpoint_url` argument, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else what botocore resolves (a profile's
`endpoint_url`, or AWS itself). Credentials come only from the standard AWS chain (environment, shared credentials
and config files / `AWS_PROFILE`, ...): they are never taken from dataset files, never stored on a Storage object,
never pickled and never written into messages.

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
One attempt is bounded by botocore's connect and read timeouts (CONNECT_TIMEOUT_S, READ_TIMEOUT_S): a server that is
stopped rather than killed accepts connections but never answers. botocore's and s3fs's own retry loops are switched
off (s3fs's retries every exception five times without waiting), so that every retry is logged and counted here.
Permanent failures (missing bucket or object, no or wrong credentials, access denied, TLS errors) raise `StorageError`
at once; its message names the location (endpoint, bucket, prefix), the object, what was expected and what was found.

Storage objects are cheap to create, picklable, and build their s3fs client lazily once per process, so they can be
handed to Grain worker processes (spawned or forked).
"""

import errno
import hashlib
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
  """Opens a folder path, `file://` URL or `s3://bucket/prefix` (no I/O happens until the first call)."""
  if isinstance(location, Storage):
    return location
  location = os.fspath(location)
  if location.startswith("s3://"):
    return S3Storage(location, endpoint_url)
  if "://" in location and not location.startswith("file://"):
    raise StorageError(f"{location}: unsupported location; expected a folder path, file:// or s3://bucket/prefix",
                       location)
  return LocalStorage(location.removeprefix("file://"))


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
# S3-compatible object stores


def _client_error_code(e: BaseException) -> str | None:
  """The S3 error code (or HTTP status) behind an s3fs / botocore exception, if any."""
  for err in (e, e.__cause__, e.__context__):
    response = getattr(err, "response", None)
    if isinstance(response, dict):
      code = response.get("Error", {}).get("Code")
      status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
      return str(code or status)
  return None


def _is_transient(e: BaseException) -> bool:
  """Failures that another attempt may cure: refused or dropped connections, timeouts, 5xx, throttling."""
  from botocore import exceptions as boto_exceptions  # pylint: disable=g-import-not-at-top
  if isinstance(e, RetriesExhausted):
    return False  # Already retried for a whole budget.
  if isinstance(e, (boto_exceptions.SSLError, boto_exceptions.NoCredentialsError,
                    boto_exceptions.PartialCredentialsError, PermissionError, FileNotFoundError)):
    return False  # A certificate, credential, permission or missing-object problem does not cure itself.
  if isinstance(e, (ConnectionError, TimeoutError, boto_exceptions.ConnectionError, boto_exceptions.HTTPClientError)):
    return True  # Refused / reset / aborted connections, unreachable endpoints, connect and read timeouts.
  from s3fs.core import S3_RETRYABLE_ERRORS  # pylint: disable=g-import-not-at-top  (timeouts, truncated bodies)
  if isinstance(e, S3_RETRYABLE_ERRORS):
    return True
  try:
    import aiohttp  # pylint: disable=g-import-not-at-top
    if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)):
      return True
  except ImportError:
    pass
  code = _client_error_code(e)
  if code in _TRANSIENT_CODES:
    return True
  return isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE)


def _answered(e: BaseException) -> bool:
  """Whether a failure carries an answer of the server (an HTTP error response), not a connection problem."""
  return _client_error_code(e) is not None or isinstance(e, (FileNotFoundError, PermissionError))


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
                    clock: Callable[[], float] = time.monotonic) -> T:
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
      if endpoint is not None and _answered(e):
        _answered_endpoints.add(endpoint)
      if not _is_transient(e):
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


class S3Storage(Storage):
  """`s3://bucket/prefix` on an S3-compatible endpoint, through s3fs (one client per process, built lazily)."""

  def __init__(self, location: str, endpoint_url: str | None = None):
    rest = location.removeprefix("s3://").strip("/")
    self.bucket, _, prefix = rest.partition("/")
    self.prefix = prefix.strip("/")
    if not self.bucket:
      raise StorageError(f"{location}: expected s3://bucket/prefix, found no bucket name", location)
    # The endpoint is fixed when the storage is opened, so that worker processes use the same one.
    self.endpoint_url = (endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                         or None)
    self._fs = None
    self._fs_pid = None
    self._bucket_exists = None

  def __getstate__(self):
    state = self.__dict__.copy()
    state.update(_fs=None, _fs_pid=None, _bucket_exists=None, _endpoint_answered=self._endpoint in _answered_endpoints)
    return state

  def __setstate__(self, state):
    # A worker process started while the server is down must wait for it like its parent, not fail fast.
    if state.pop("_endpoint_answered", False):
      _answered_endpoints.add(state["endpoint_url"] or "")
    self.__dict__.update(state)

  @property
  def _endpoint(self) -> str:
    """The key of this storage's endpoint among those that have answered in this process."""
    return self.endpoint_url or ""

  def retry_budget_s(self) -> float:
    """Seconds a transient failure would be retried now: the retry budget, or less until the endpoint has answered."""
    return _budget_for(self._endpoint, retry_budget())[0]

  def describe(self) -> str:
    where = self.endpoint_url or "the default AWS endpoint (or the AWS profile's endpoint_url)"
    return f"s3://{self.bucket}/{self.prefix} at {where}" if self.prefix else f"s3://{self.bucket} at {where}"

  def _key(self, relpath: str) -> str:
    relpath = _clean_relpath(relpath, self.describe())
    return "/".join(p for p in (self.prefix, relpath) if p)

  def url(self, relpath: str = "") -> str:
    return f"s3://{self.bucket}/{self._key(relpath)}"

  def _path(self, relpath: str) -> str:
    return f"{self.bucket}/{self._key(relpath)}"

  @property
  def fs(self):
    """This process's s3fs client for this endpoint and AWS environment (see `_client`)."""
    pid = os.getpid()
    if self._fs is None or self._fs_pid != pid:
      self._fs = _client(self.endpoint_url)
      self._fs_pid = pid
      self._bucket_exists = None
    return self._fs

  # -- errors ----------------------------------------------------------------------------------------------------------

  def _probe_bucket(self) -> bool | None:
    """True / False when the bucket's existence could be established, None when the probe itself failed."""
    if self._bucket_exists is None:
      try:
        self.fs.call_s3("list_objects_v2", Bucket=self.bucket, MaxKeys=1)
        self._bucket_exists = True
      except FileNotFoundError:
        self._bucket_exists = False
      except Exception:  # pylint: disable=broad-except  (credentials or network: the caller reports the original)
        return None
    return self._bucket_exists

  def _error(self, action: str, relpath: str, e: BaseException, expected: str) -> StorageError:
    from botocore import exceptions as boto_exceptions  # pylint: disable=g-import-not-at-top
    detail = f"{type(e).__name__}: {e}"
    if isinstance(e, FileNotFoundError):
      if self._probe_bucket() is False:
        found = f"bucket {self.bucket!r} does not exist at this endpoint"
      else:
        found = "no such object"
      detail = ""
    elif isinstance(e, PermissionError):
      found = ("access denied: the credentials from the AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
               "AWS_PROFILE) were rejected or lack permission")
    elif isinstance(e, boto_exceptions.NoCredentialsError):
      found = ("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE naming a profile "
               "in ~/.aws/credentials")
      detail = ""
    elif isinstance(e, boto_exceptions.PartialCredentialsError):
      found = "incomplete AWS credentials (for example an access key without its secret)"
    elif isinstance(e, RetriesExhausted):
      endpoint = self.endpoint_url or "(default)"
      if e.first_contact:
        found = (f"the endpoint {endpoint} is unreachable: it has not answered since this process started "
                 f"({e.attempts} attempts over {e.elapsed_s:.1f} s; an endpoint that never answered gets "
                 f"{e.budget_s:g} s, not the whole retry budget); check the endpoint URL (--endpoint_url, "
                 "--config.dataset.endpoint_url or AWS_ENDPOINT_URL_S3) and that the server is running")
      else:
        state = "failing" if _answered(e.error) else "unreachable"
        found = (f"the endpoint {endpoint} {state} for {e.elapsed_s:.0f} s ({e.attempts} attempts), the whole retry "
                 f"budget of {e.budget_s:g} s; to wait longer for a server to come back, raise the budget with the "
                 f"environment variable {RETRY_BUDGET_ENV}=<seconds> or storage.set_retry_budget(seconds)")
      detail = f"{type(e.error).__name__}: {e.error}"
    elif _is_transient(e):
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
    return retry_transient(fn, f"{action} {target} ({self._where()})", self._endpoint, budget_s)

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
        else:  # No result for this path (not expected from s3fs): read it on its own.
          failed[0] = relpath_of[path]
          done[path] = self.fs.cat_file(path)
      if errors:
        path, error = next(((p, e) for p, e in errors if not _is_transient(e)), errors[0])
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
    """Names of the entries of s3fs type `entry_type` ("file" or "directory", a common prefix) inside `relpath`."""
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


def _scrub(message: str) -> str:
  """Removes the secret key of the environment from a message, should any library ever echo it."""
  for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
    secret = os.environ.get(name)
    if secret and len(secret) >= 4:
      message = message.replace(secret, "***")
  return message


# ----------------------------------------------------------------------------------------------------------------------
# s3fs clients: one per process, endpoint and AWS environment


# Environment variables that change which identity or endpoint a new client gets.
_CLIENT_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE",
               "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_DEFAULT_REGION", "AWS_REGION",
               "AWS_EC2_METADATA_DISABLED", "AWS_CA_BUNDLE", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_clients: dict = {}
_clients_lock = threading.Lock()
_loader = None


def _forget_clients() -> None:
  """In a forked child: the parent's clients belong to the parent's event-loop thread, which did not survive."""
  global _clients_lock
  _clients.clear()
  _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_clients)


def _client(endpoint_url: str | None):
  """An s3fs client, shared by the Storage objects of this process with the same endpoint and AWS environment.

  Never s3fs's own instance cache (it ignores the environment, and a fork copies it); keyed by process id. The
  environment enters the key only as a hash. All clients share one botocore data loader, so the S3 service model
  (a large JSON file) is parsed once per process rather than once per client.
  """
  global _loader
  env = "\0".join(os.environ.get(k, "\1") for k in _CLIENT_ENV)
  key = (os.getpid(), endpoint_url, hashlib.sha256(env.encode()).hexdigest())
  with _clients_lock:
    fs = _clients.get(key)
    if fs is None:
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
          skip_instance_cache=True,     # See above.
          use_listings_cache=False,     # Listings must reflect the bucket now, not an earlier call.
          max_concurrency=1,            # Whole-object GETs without a HEAD first.
          config_kwargs={"retries": {"total_max_attempts": BOTO_MAX_ATTEMPTS, "mode": "standard"},
                         "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S})
      fs.retries = 1  # s3fs's own loop retries any exception 5 times without waiting; ours is retry_transient.
      _clients[key] = fs
    return fs
