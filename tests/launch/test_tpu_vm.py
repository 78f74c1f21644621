"""launch/tpu_vm.sh with the fake gcloud (tests/launch/fakes/gcloud): its help, its refusals, the calls it makes, and a
spot slice preempted mid-run that is re-created and resumes, the two workers training like one device.

The workdir is a local folder that both fake workers see (SHARED_WORKDIR=1), standing in for the bucket: the
workers are processes of this machine. WORKER_PYTHON is this venv's interpreter: the fake workers cannot download
the requirements, so install only copies the code (test_install_creates_the_venv checks the venv command itself).
"""

import subprocess
import sys

import pytest

from tests.launch import launch_helpers as lh
from tests.training import train_helpers as th

SCRIPT = th.REPO_ROOT / "launch" / "tpu_vm.sh"
TIMEOUT_S = 1200  # Two launches of two processes, each compiling the train step; loaded 2-core machines are slow.


def launch(tmp_path, command: str, *flags: str, scenario: dict, timeout: float = 60,
           **variables: str) -> subprocess.CompletedProcess:
  env = lh.fake_env(tmp_path / "fake", scenario, TPU="kmax-test", ZONE="us-west4-a", POLL_S="0.05",
                    LOG_DIR=str(tmp_path / "logs"), **variables)
  return subprocess.run(["bash", str(SCRIPT), command, *flags], env=env, cwd=th.REPO_ROOT, capture_output=True,
                        text=True, timeout=timeout)


def steps(calls: list[dict]) -> list[str]:
  """The gcloud calls without the state polls, as 'create', 'scp', 'install', 'run', 'delete'."""
  names = []
  for call in calls:
    argv = call["argv"]
    verb = argv[3]
    if verb == "describe":
      continue
    if verb == "ssh":
      command = next(a for a in argv if a.startswith("--command="))
      verb = "run" if "panoptic_jax.main" in command else "install"
    names.append(verb)
  return names


def test_help_names_the_commands_and_variables():
  result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  for word in ["train", "create", "install", "run", "delete", "TPU", "ZONE", "ACCELERATOR", "RUNTIME", "SPOT",
               "WORKDIR", "MAX_RESTARTS", "KEEP_TPU", "WORKER_PYTHON", "FORWARD_ENV", "SHARED_WORKDIR", "Preemption",
               "Costs", "queued-resources", "--multihost", "jax[tpu]==0.10.2"]:
    assert word in result.stdout, word


def test_a_local_workdir_is_refused_before_any_gcloud_call(tmp_path):
  result = launch(tmp_path, "train", scenario={}, WORKDIR=str(tmp_path / "run"))
  assert result.returncode == 1
  assert "is a local path" in result.stderr and "gs://bucket/prefix" in result.stderr
  assert lh.calls(tmp_path / "fake") == []


def test_a_failed_request_is_an_error_and_is_deleted(tmp_path):
  """On-demand v4 whose queued resource goes FAILED: the state in the error, and the request deleted on exit."""
  result = launch(tmp_path, "train", scenario={"slices": [{"states": ["ACCEPTED", "FAILED"]}]},
                  WORKDIR="gs://bucket/run", SPOT="0", ACCELERATOR="v4-8")
  assert result.returncode == 1, lh.output(result)
  assert "queued resource kmax-test is FAILED instead of ACTIVE" in result.stderr
  calls = lh.calls(tmp_path / "fake")
  create = calls[1]["argv"]  # After the first look for an existing queued resource.
  assert create[:5] == ["compute", "tpus", "queued-resources", "create", "kmax-test"]
  assert {"--zone=us-west4-a", "--node-id=kmax-test", "--accelerator-type=v4-8",
          "--runtime-version=tpu-ubuntu2204-base"} <= set(create)
  assert "--spot" not in create
  assert steps(calls) == ["create", "delete"]


def test_install_creates_the_venv(tmp_path):
  """Without WORKER_PYTHON, install makes the venv and installs the pinned requirements with TPU JAX."""
  scenario = {"slices": [{"states": ["ACTIVE"], "run_commands": False}]}
  assert launch(tmp_path, "create", scenario=scenario).returncode == 0
  result = launch(tmp_path, "install", scenario=scenario)
  assert result.returncode == 0, lh.output(result)
  calls = lh.calls(tmp_path / "fake")
  scp, ssh = [c["argv"] for c in calls if c["argv"][3] in ("scp", "ssh")][-2:]
  assert scp[4].endswith("/panoptic_jax.tgz") and scp[5] == "kmax-test:panoptic_jax.tgz" and "--worker=all" in scp
  command = next(a for a in ssh if a.startswith("--command="))
  assert "tar -xzf ~/panoptic_jax.tgz -C ~/panoptic_jax" in command
  assert "uv venv -q --python 3.11 .venv" in command
  assert "pip install -q --python .venv/bin/python -r requirements.txt 'jax[tpu]==0.10.2'" in command
  copied = tmp_path / "fake" / "homes" / "slice0"
  assert sorted(p.name for p in copied.iterdir()) == ["worker0", "worker1"]
  assert (copied / "worker1" / "panoptic_jax.tgz").stat().st_size > 0


@pytest.mark.slow
def test_train_is_preempted_recreated_and_resumes_like_one_device(tmp_path):
  """A spot v5e slice: queued, ACTIVE, installed, run on both workers; preempted after step 2 (SIGTERM, then the
  queued resource SUSPENDED and ssh dropped); deleted, re-created, re-installed, re-run from the checkpoint; deleted
  at the end. The metrics of the two runs together equal the 1-device run's."""
  workdir = tmp_path / "workdir"
  scenario = {"slices": [
      {"states": ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"],
       "preempt_when": {"file": str(workdir / "metrics.jsonl"), "contains": '"step": 2,'}},
      {"states": ["ACTIVE"]}]}
  env = lh.fake_env(tmp_path / "fake", scenario, TPU="kmax-test", ZONE="us-west4-a", POLL_S="0.05",
                    LOG_DIR=str(tmp_path / "logs"), PREEMPT_GRACE_S="2", WORKDIR=str(workdir), SHARED_WORKDIR="1",
                    WORKER_PYTHON=sys.executable, CONFIG="configs/demo.py")
  # The reference first: run beside the workers it could slow one of them past gloo's fixed 30 s wait.
  reference = th.losses(th.one_device_run())
  process = lh.start(["bash", str(SCRIPT), "train", *lh.tiny_run_flags(workdir)], env)
  try:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
  finally:
    lh.stop(process)
  result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
  assert result.returncode == 0, lh.output(result)
  calls = lh.calls(tmp_path / "fake")
  assert steps(calls) == ["create", "scp", "install", "run", "delete", "create", "scp", "install", "run", "delete"]
  create = calls[1]["argv"]
  assert {"--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
  commands = [a for c in calls for a in c["argv"] if a.startswith("--command=") and "panoptic_jax.main" in a]
  assert all("--config=configs/demo.py" in c and f"--workdir={workdir}" in c for c in commands)
  assert "slice state (queued resource/node): SUSPENDED/PREEMPTED" in result.stderr
  assert "preempted: re-creating the slice (restart 1 of 10)" in result.stderr
  assert "Stopped at step" in result.stdout  # The workers saved on SIGTERM, before the slice went.
  assert "process 1 of 2, 2 local / 4 global devices" in result.stdout
  losses = th.losses(workdir)
  assert sorted(losses) == sorted(reference)
  th.assert_close(losses, reference)
