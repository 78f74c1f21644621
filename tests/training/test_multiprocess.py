"""Two local processes x two CPU devices (jax.distributed over gloo) train like one device.

main.py runs twice with --coordinator_address on a free loopback port; process 0 writes metrics.jsonl. Batch
statistics are global under jit over the sharded batch, so the losses agree with the 1-device run.
"""

import subprocess
import time

import pytest

from tests.training import train_helpers as th

pytestmark = pytest.mark.slow
TIMEOUT_S = 420


def test_two_processes_of_two_devices_match_one_device():
  workdir = th.session_dir() / "two_processes"
  address = f"127.0.0.1:{th.free_port()}"
  processes, logs = [], []
  try:
    for index in range(2):
      log = open(th.session_dir() / f"process{index}.log", "w")
      logs.append(log)
      command = th.main_command(workdir, "train", th.tiny_dataset(), extra_flags=[
          f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}"])
      processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=th.multiprocess_env(2),
                                        cwd=th.REPO_ROOT))
    th.one_device_run()  # The reference, computed in this process while the two train.
    deadline = time.monotonic() + TIMEOUT_S
    for process in processes:
      process.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for process in processes:
      th.kill(process)
    for log in logs:
      log.close()
  outputs = [(th.session_dir() / f"process{i}.log").read_text() for i in range(2)]
  for index, process in enumerate(processes):
    assert process.returncode == 0, f"process {index}:\n{outputs[index][-4000:]}"
  assert "process 0 of 2, 2 local / 4 global devices" in outputs[0]
  assert "mesh {'data': 4, 'fsdp': 1}" in outputs[0]
  assert th.checkpoint_steps(workdir) == [4, 6]  # Both processes saved together.
  metrics, expected = th.train_metrics(workdir), th.train_metrics(th.one_device_run())
  assert sorted(metrics) == sorted(expected)
  losses = {step: m["train/loss"] for step, m in metrics.items()}
  reference = {step: m["train/loss"] for step, m in expected.items()}
  th.assert_close(losses, reference)
