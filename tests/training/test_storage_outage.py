"""Training from an S3 bucket whose server is killed mid-run and comes back: the run waits for it and finishes."""

import subprocess
import time

import pytest

from panoptic_jax.data import storage
from tests import s3_server
from tests.training import train_helpers as th

pytestmark = pytest.mark.slow
OUTAGE_S = 30
SUBPROCESS_TIMEOUT_S = 300


def test_training_survives_a_30_s_s3_server_outage(s3_own_server, tmp_path):
  bucket = s3_own_server.make_bucket()
  s3_own_server.filesystem().put(str(th.tiny_dataset()) + "/", f"{bucket}/demo/", recursive=True)
  location = f"s3://{bucket}/demo"
  workdir, log_path = tmp_path / "run", tmp_path / "main.log"
  command = th.main_command(workdir, "train", th.tiny_dataset(), dataset__train=f"{location}/train",
                            dataset__val=f"{location}/val", dataset__endpoint_url=s3_own_server.endpoint_url)
  env = th.subprocess_env(8)  # With the server's credentials, which s3_own_server put in os.environ.
  env.pop(storage.RETRY_BUDGET_ENV, None)  # The default budget.
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=th.REPO_ROOT)
    try:
      deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
      while not th.losses(workdir):  # The data is being read: kill the server mid-run.
        assert process.poll() is None, f"main.py ended early:\n{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step was logged in time:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.05)
      s3_server.kill_server(s3_own_server)
      time.sleep(OUTAGE_S)
      s3_server.restart_server(s3_own_server)
      returncode = process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
      th.kill(process)
  text = log_path.read_text()
  assert returncode == 0, text[-3000:]
  assert sorted(th.losses(workdir)) == list(range(1, th.STEPS + 1))
  retries = [line for line in text.splitlines() if f"bucket {bucket!r}" in line and "retrying in" in line]
  assert retries, text[-3000:]
  assert "succeeded at attempt" in text
