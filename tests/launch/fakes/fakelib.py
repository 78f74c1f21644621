"""What the fake `gcloud`, `srun`, `sbatch` and `scontrol` share: the call log, the scenario, local worker processes.

Everything lives in the folder that FAKE_LAUNCH_DIR names:
  calls.jsonl     one {"program": ..., "argv": [...]} line per call, in order (what the tests check)
  scenario.json   written by the test: what the fakes answer and when they preempt (see gcloud and sbatch)
  state.json      the fakes' own state between calls (the slice, its describe answers, the SLURM job)
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

DIR = pathlib.Path(os.environ["FAKE_LAUNCH_DIR"])


def record(program: str, argv: list[str]) -> None:
  with open(DIR / "calls.jsonl", "a") as f:
    f.write(json.dumps({"program": program, "argv": argv}) + "\n")


def scenario() -> dict:
  path = DIR / "scenario.json"
  return json.loads(path.read_text()) if path.exists() else {}


def load_state() -> dict:
  path = DIR / "state.json"
  return json.loads(path.read_text()) if path.exists() else {}


def save_state(state: dict) -> None:
  (DIR / "state.json").write_text(json.dumps(state))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def condition_met(when: dict | None) -> bool:
  """A scenario trigger {"file": PATH, "contains": TEXT}: the file exists and holds the text."""
  if not when:
    return False
  path = pathlib.Path(when["file"])
  return path.exists() and when.get("contains", "") in path.read_text()


def fail(message: str, status: int = 1) -> None:
  print(message, file=sys.stderr)
  sys.exit(status)


class Workers:
  """Processes started together, each in its own session (signals reach its children), output streamed with a
  `[name]` prefix."""

  def __init__(self, commands: list[tuple[str, list[str], dict[str, str], pathlib.Path]]):
    self._lock = threading.Lock()
    self._signalled_at: float | None = None  # When this fake was told to stop (forward_signals).
    self.processes = []
    self._threads = []
    for name, argv, env, cwd in commands:
      process = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True, text=True, errors="replace")
      self.processes.append(process)
      thread = threading.Thread(target=self._stream, args=(name, process), daemon=True)
      thread.start()
      self._threads.append(thread)

  def _stream(self, name: str, process: subprocess.Popen) -> None:
    for line in process.stdout:
      with self._lock:
        sys.stdout.write(f"[{name}] {line}")
        sys.stdout.flush()

  def signal(self, signum: int) -> None:
    for process in self.processes:
      if process.poll() is None:
        try:
          os.killpg(process.pid, signum)
        except ProcessLookupError:
          pass

  def wait(self, stop_when: dict | None = None, grace_s: float = 60.0) -> tuple[list[int], bool]:
    """Waits for all; when `stop_when` is met first, sends them SIGTERM and waits up to `grace_s` before SIGKILL (and
    SIGKILL too `grace_s` after a forwarded signal). Returns (exit statuses, whether they were stopped)."""
    stopped = False
    while any(p.poll() is None for p in self.processes):
      if not stopped and condition_met(stop_when):
        stopped = True
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
          time.sleep(0.1)
        self.signal(signal.SIGKILL)
      if self._signalled_at is not None and time.monotonic() - self._signalled_at > grace_s:
        self.signal(signal.SIGKILL)  # A test that gives up leaves no worker behind.
      time.sleep(0.1)
    for thread in self._threads:
      thread.join(timeout=10)
    return [p.wait() for p in self.processes], stopped

  def forward_signals(self) -> None:
    """SIGTERM / SIGINT to this fake go on to the workers (as srun and an ssh session's end do)."""
    def forward(signum, frame):
      del frame
      self._signalled_at = time.monotonic()
      self.signal(signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
      signal.signal(signum, forward)


def worst(statuses: list[int]) -> int:
  """One exit status for several processes: the first failure's (a signal's death as 128 + signal)."""
  failures = [s if s >= 0 else 128 - s for s in statuses if s != 0]
  return failures[0] if failures else 0
