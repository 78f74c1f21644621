"""The workdir lease: one training run per workdir, local or in a bucket; a dead run's successor takes over."""

import json
import socket
import subprocess
import sys
import time

import pytest

from panoptic_jax.training import workdir as workdir_lib


@pytest.fixture(params=["local", "s3", "gs"])
def location(request, tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, "SETTLE_S", 0.05)
  if request.param == "local":
    return str(tmp_path / "run")
  root = request.getfixturevalue({"s3": "s3_root", "gs": "gcs_root"}[request.param])  # Real servers (conftest).
  return f"{request.param}://{root}/run"


def _write_lease(location: str, **fields) -> None:
  record = {"owner": "someone-else", "host": socket.gethostname(), "pid": 1, "since": "2026-01-01T00:00:00",
            "renewed": time.time(), "expires": time.time() + 60, **fields}
  workdir_lib.Workdir(location).storage.write_bytes(workdir_lib.LOCK, json.dumps(record).encode())


def test_a_second_run_is_refused_while_the_lease_runs_and_the_lease_is_given_back(location):
  workdir = workdir_lib.Workdir(location)
  with workdir.lock():
    held = json.loads(workdir.storage.read_bytes(workdir_lib.LOCK))
    assert held["expires"] > time.time()
    with pytest.raises(workdir_lib.WorkdirError, match=r"is in use by another run \(pid \d+ on .*expires in \d+ s"):
      with workdir_lib.Workdir(location).lock():
        pass
  assert not workdir.storage.exists(workdir_lib.LOCK)
  with workdir.lock():  # Free again.
    pass


def test_an_expired_lease_of_another_host_is_taken_over(location, caplog):
  _write_lease(location, host="a-preempted-vm", expires=time.time() - 1)
  with workdir_lib.Workdir(location).lock():
    pass
  assert "Taking over the workdir lease of a run that is gone (pid 1 on a-preempted-vm" in caplog.text


def test_a_running_lease_of_another_host_is_respected(location):
  _write_lease(location, host="another-vm")
  with pytest.raises(workdir_lib.WorkdirError, match="in use by another run .* on another-vm"):
    with workdir_lib.Workdir(location).lock():
      pass


def test_the_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(location):
  finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  _write_lease(location, pid=int(finished.stdout))  # A pid that no longer runs (its lease has not expired).
  with workdir_lib.Workdir(location).lock():
    pass


def test_a_run_whose_lease_was_taken_over_stops_before_writing(location, monkeypatch):
  monkeypatch.setattr(workdir_lib, "RENEW_EVERY_S", 0.05)
  with workdir_lib.Workdir(location).lock() as lease:
    _write_lease(location, host="another-vm")  # E.g. after this run could not renew for a whole lease.
    deadline = time.monotonic() + 10
    while lease.lost is None and time.monotonic() < deadline:
      time.sleep(0.05)
    with pytest.raises(workdir_lib.WorkdirError, match="another run took over the workdir .* on another-vm"):
      lease.check()
  assert workdir_lib.Workdir(location).storage.exists(workdir_lib.LOCK)  # The new holder's lease stays.
