"""What the launch-script tests share: the fakes on PATH, the scenario they follow, and the calls they record.

The fakes (tests/launch/fakes/) stand in for gcloud and SLURM and run the workers' command here as several JAX CPU
processes; see tests/launch/fakes/fakelib.py.
"""

import json
import os
import pathlib
import signal
import subprocess

from tests.training import train_helpers as th

FAKES = th.REPO_ROOT / "tests" / "launch" / "fakes"


def fake_env(fake_dir: pathlib.Path, scenario: dict, **variables: str) -> dict[str, str]:
  """The environment of a launch script under test: the fakes first on PATH, two CPU devices per process, and the
  scenario written where the fakes read it."""
  fake_dir.mkdir(parents=True, exist_ok=True)
  (fake_dir / "scenario.json").write_text(json.dumps(scenario))
  env = th.subprocess_env(2)
  # The workers import the package from the folder they run in (the TPU workers' copy), not from this checkout; the
  # path holds only the compilation-cache hook of the multi-process runs (th.CACHE_HOOK).
  env["PYTHONPATH"] = os.pathsep.join([str(th.CACHE_HOOK), *filter(None, [os.environ.get("PYTHONPATH")])])
  env.update(PATH=f"{FAKES}{os.pathsep}{env['PATH']}", FAKE_LAUNCH_DIR=str(fake_dir), **variables)
  return env


def calls(fake_dir: pathlib.Path) -> list[dict]:
  """The fakes' recorded calls, in order: {"program": ..., "argv": [...]}."""
  path = fake_dir / "calls.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tiny_run_flags(workdir: pathlib.Path) -> list[str]:
  """train_helpers' tiny 6-step run as main.py flags (without --config and --workdir, which the scripts give), with
  the tests' persistent compilation cache."""
  command = th.main_command(workdir, "train", th.tiny_dataset())
  return [a for a in command if a.startswith(("--config.", "--mode=", "--compilation_cache="))]


def output(result: subprocess.CompletedProcess) -> str:
  return f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
  """A launch script in its own process group (so that `stop` reaches the fakes it started), output captured."""
  return subprocess.Popen(command, env=env, cwd=th.REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
  """Ends a script that `start` started and is still running: SIGTERM to its group (the fakes pass it on to their
  workers and SIGKILL them a minute later), then SIGKILL."""
  if process.poll() is not None:
    return
  os.killpg(process.pid, signal.SIGTERM)
  try:
    process.wait(timeout=90)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
