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

Transient failures (connection reset, HTTP 5xx, throttling) are retried with bounded exponential backoff: botocore's
"standard" retry mode per request (BOTO_MAX_ATTEMPTS), and one outer loop here (RETRY_ATTEMPTS, e.g. for a body
that breaks off while being read). s3fs's own retry loop is switched off: it retries every exception, even an
unreachable endpoint, five times without waiting.
Permanent ones (missing bucket or object, no or wrong credentials, unreachable endpoint) raise `StorageError`, whose
message names the location (endpoint, bucket, prefix), the object, what was expected and what was found.

Storage objects are cheap to create, picklable, and build their s3fs client lazily once per process, so they can be
handed to Grain worker processes (spawned or forked).
"""

import errno
import hashlib
import logging
import os
import pathlib
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

# Attempts for botocore's own retry loop (per request) and for the outer loop here (per call).
BOTO_MAX_ATTEMPTS = 3
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 5.0
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException",
    "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
})


class StorageError(OSError):
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

  def exists(self, relpath: str) -> bool:
    """Whether the file exists; StorageError when the location itself cannot be reached or read."""
    raise NotImplementedError

  def list_files(self, relpath: str = "") -> list[str]:
    """Names of the files directly inside the folder `relpath` (no recursion, no folders), sorted.

    A folder that does not exist lists as empty (object stores have no empty folders to tell the two apart).
    """
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

  def exists(self, relpath: str) -> bool:
    return self._path(relpath).is_file()

  def list_files(self, relpath: str = "") -> list[str]:
    folder = self._path(relpath)
    try:
      with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_file())
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
  """Failures that another attempt may cure: dropped connections, timeouts, 5xx, throttling."""
  from botocore import exceptions as boto_exceptions  # pylint: disable=g-import-not-at-top
  if isinstance(e, (boto_exceptions.EndpointConnectionError, boto_exceptions.NoCredentialsError,
                    boto_exceptions.PartialCredentialsError, PermissionError, FileNotFoundError)):
    return False  # Unreachable endpoints were already retried by botocore; the rest are permanent.
  if isinstance(e, (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, TimeoutError,
                    boto_exceptions.ConnectionClosedError, boto_exceptions.ReadTimeoutError,
                    boto_exceptions.ResponseStreamingError)):
    return True
  from s3fs.core import S3_RETRYABLE_ERRORS  # pylint: disable=g-import-not-at-top  (timeouts, truncated bodies)
  if isinstance(e, S3_RETRYABLE_ERRORS):
    return True
  try:
    import aiohttp  # pylint: disable=g-import-not-at-top
    if isinstance(e, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
      return True
  except ImportError:
    pass
  code = _client_error_code(e)
  if code in _TRANSIENT_CODES:
    return True
  return isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.ETIMEDOUT, errno.EPIPE)


def retry_transient(fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS, base_delay_s: float = RETRY_BASE_DELAY_S,
                    max_delay_s: float = RETRY_MAX_DELAY_S, sleep: Callable[[float], None] = time.sleep) -> T:
  """Calls fn, retrying transient failures with exponential backoff and full jitter; other errors pass through."""
  for attempt in range(attempts):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      if attempt == attempts - 1 or not _is_transient(e):
        raise
      delay = min(max_delay_s, base_delay_s * 2**attempt) * (0.5 + random.random() / 2)
      logging.warning("storage: transient %s (attempt %d of %d), retrying in %.2f s", type(e).__name__,
                      attempt + 1, attempts, delay)
      sleep(delay)
  raise AssertionError("unreachable")


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
    state.update(_fs=None, _fs_pid=None, _bucket_exists=None)
    return state

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
    elif isinstance(e, boto_exceptions.EndpointConnectionError):
      found = f"the endpoint {self.endpoint_url or '(default)'} is unreachable (after retries)"
    elif _is_transient(e):
      found = f"a transient failure that persisted after {RETRY_ATTEMPTS} attempts"
    else:
      found = "an error"
    message = (f"cannot {action} {self.url(relpath)} (endpoint {self.endpoint_url or 'default'}, bucket "
               f"{self.bucket!r}, prefix {self.prefix!r}): expected {expected}, found {found}")
    if detail:
      message += f" [{detail}]"
    return StorageError(_scrub(message), self.describe(), relpath)

  def _call(self, action: str, relpath: str, expected: str, fn: Callable[[], T]) -> T:
    try:
      return retry_transient(fn)
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
    results = self._call("read", relpaths[0], "existing objects",
                         lambda: self.fs.cat(paths, on_error="return"))
    out = []
    for relpath, path in zip(relpaths, paths):
      result = results.get(path)
      if isinstance(result, BaseException) or result is None:
        if result is None or _is_transient(result):
          out.append(self.read_bytes(relpath))  # Retries this one object (or reports it) on its own.
          continue
        raise self._error("read", relpath, result, "an existing object")
      out.append(result)
    return out

  def write_bytes(self, relpath: str, data: bytes) -> None:
    path = self._path(relpath)
    self._call("write", relpath, "a writable bucket", lambda: self.fs.pipe_file(path, bytes(data)))

  def exists(self, relpath: str) -> bool:
    path = self._path(relpath)
    try:
      retry_transient(lambda: self.fs.info(path))
      return True
    except FileNotFoundError as e:
      if self._probe_bucket() is False:
        raise self._error("look up", relpath, e, "an existing bucket") from None
      return False
    except Exception as e:  # pylint: disable=broad-except
      raise self._error("look up", relpath, e, "a reachable bucket") from None

  def list_files(self, relpath: str = "") -> list[str]:
    key = self._key(relpath)
    folder = f"{self.bucket}/{key}".rstrip("/")
    try:
      entries = retry_transient(lambda: self.fs.ls(folder, detail=True, refresh=True))
    except FileNotFoundError as e:
      if self._probe_bucket() is False:
        raise self._error("list", relpath, e, "an existing bucket") from None
      return []  # An empty or absent prefix.
    except Exception as e:  # pylint: disable=broad-except
      raise self._error("list", relpath, e, "a listable bucket") from None
    names = []
    for entry in entries:
      if entry.get("type") != "file":
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
          config_kwargs={"retries": {"max_attempts": BOTO_MAX_ATTEMPTS, "mode": "standard"},
                         "connect_timeout": 10, "read_timeout": 120})
      fs.retries = 1  # s3fs's own loop retries any exception 5 times without waiting; ours is retry_transient.
      _clients[key] = fs
    return fs
