"""launch/slurm_gpu.sbatch with the fake sbatch, srun and scontrol (tests/launch/fakes): its help, and a two-node job
that gets its time-limit signal mid-run, checkpoints, requeues itself and resumes, the two tasks training like one
device.

The tasks are processes of this machine on CPU devices: the workdir is a local folder both see, and the fake srun
gives them gloo for the collectives that NCCL does on GPUs.
"""

import subprocess
import sys

import pytest

from tests.launch import launch_helpers as lh
from tests.training import train_helpers as th

SCRIPT = th.REPO_ROOT / "launch" / "slurm_gpu.sbatch"
TIMEOUT_S = 1200  # Two launches of two processes, each compiling the train step; loaded 2-core machines are slow.


def test_help_names_the_variables_and_the_requeue():
  result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  for word in ["sbatch", "CONFIG", "WORKDIR", "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID", "JAX_COORDINATOR_PORT", "PYTHON", "GPUS_PER_NODE", "MAX_REQUEUES", "--requeue",
               "--signal=B:USR1@300", "scontrol requeue", "jax[cuda13]==0.10.2", "Costs"]:
    assert word in result.stdout, word


def test_outside_a_job_it_says_how_to_submit():
  result = subprocess.run(["bash", str(SCRIPT), "configs/demo.py"], capture_output=True, text=True, timeout=30)
  assert result.returncode == 2
  assert "submit with sbatch, with CONFIG and WORKDIR" in result.stderr


def test_the_directives_ask_for_requeue_and_a_signal_to_the_batch_shell():
  directives = [line.split()[1] for line in SCRIPT.read_text().splitlines() if line.startswith("#SBATCH ")]
  assert {"--requeue", "--ntasks-per-node=1", "--signal=B:USR1@300", "--open-mode=append"} <= set(directives)


@pytest.mark.slow
def test_a_signalled_job_checkpoints_requeues_and_resumes_like_one_device(tmp_path):
  """sbatch --nodes=2: SIGUSR1 to the batch shell after step 2 -> SIGTERM to the srun step -> both tasks save ->
  scontrol requeue -> the job runs again and finishes from the checkpoint. The metrics equal the 1-device run's."""
  workdir = tmp_path / "workdir"
  scenario = {"signal_when": {"file": str(workdir / "metrics.jsonl"), "contains": '"step": 2,'}}
  env = lh.fake_env(tmp_path / "fake", scenario, PYTHON=sys.executable)
  command = ["sbatch", "--nodes=2", str(SCRIPT), str(th.REPO_ROOT / "configs" / "demo.py"), str(workdir),
             *lh.tiny_run_flags(workdir)]
  # The reference first: run beside the workers it could slow one of them past gloo's fixed 30 s wait.
  reference = th.losses(th.one_device_run())
  process = lh.start(command, env)
  try:
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
  finally:
    lh.stop(process)
  assert process.returncode == 0, f"{stdout[-6000:]}\n{stderr[-3000:]}"
  calls = [(c["program"], c["argv"]) for c in lh.calls(tmp_path / "fake")]
  programs = [program for program, _ in calls]
  assert programs == ["sbatch", "srun", "scontrol", "srun"], calls
  assert calls[2][1] == ["requeue", "4000"]
  assert calls[1][1][:4] == ["--kill-on-bad-exit=1", sys.executable, "-m", "panoptic_jax.main"]
  assert "--multihost" in calls[1][1]
  assert "received SIGUSR1: stopping the run" in stdout
  assert "Stopped at step" in stdout  # Both tasks saved on SIGTERM.
  assert "job 4000, restart 1: 2 nodes" in stdout
  assert "process 1 of 2, 2 local / 4 global devices" in stdout
  losses = th.losses(workdir)
  assert sorted(losses) == sorted(reference)
  th.assert_close(losses, reference)
