"""Shared pieces of the training-system tests: a tiny config, the tiny dataset, runs of main.py, metrics files.

Every run uses the kmax_tiny model on 65x65 crops of a 16 + 8 image synthetic dataset, 6 steps of batch 8, so
that all runs share a handful of compiled programs (the persistent compilation cache holds them across processes).
Results of expensive runs are memoised per session here rather than in session fixtures, because fixtures
imported into several test modules would run once per module.
"""

import functools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import pytest

from configs import demo
from panoptic_jax.data import synthetic
from panoptic_jax.training import sharding, train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "jax_compilation"  # The dir tests/conftest.py gives in-process JAX.
# A sitecustomize that lets every process of a multi-process run write the compilation cache (see its docstring).
CACHE_HOOK = REPO_ROOT / "tests" / "launch" / "cache_hook"
STEPS = 6

_SESSION: dict[str, Any] = {}


def session_dir() -> pathlib.Path:
  """A temporary folder shared by the test modules of this session (removed at interpreter exit)."""
  if "dir" not in _SESSION:
    _SESSION["tmp"] = tempfile.TemporaryDirectory(prefix="panoptic_train_tests_")
    _SESSION["dir"] = pathlib.Path(_SESSION["tmp"].name)
  return _SESSION["dir"]


def tiny_dataset() -> pathlib.Path:
  """The synthetic dataset (train/ and val/ inside), generated once per session."""
  if "data" not in _SESSION:
    root = synthetic.ensure_demo_dataset(session_dir() / "data", num_train=16, num_val=8, seed=0, size=(64, 96),
                                         num_workers=0)
    _SESSION["data"] = pathlib.Path(root)
  return _SESSION["data"]


# Overrides of configs/demo.py, as (dotted field, value); the same list feeds in-process configs and main.py flags.
def overrides(data_root: pathlib.Path, **extra) -> list[tuple[str, Any]]:
  values = {
      "dataset.train": str(data_root / "train"), "dataset.val": str(data_root / "val"), "model.preset": "kmax_tiny",
      "input.crop_size": (65, 65), "input.resize_to_crop": True, "input.num_workers": 0, "loss.instance_sample_k": 64,
      "optim.base_lr": 2e-3, "optim.warmup_steps": 1, "train.steps": STEPS, "train.log_every": 1, "train.checkpoint_every": 2,
      "train.keep_checkpoints": 2, "train.eval_every": 1000, "eval.max_images": 4, "eval.num_visualizations": 2,
      "mesh.data": -1, "mesh.fsdp": 1,
  }
  values.update({k.replace("__", "."): v for k, v in extra.items()})
  return list(values.items())


def config(data_root: pathlib.Path, **extra) -> ml_collections.ConfigDict:
  """configs/demo.py with the tiny overrides; `extra` uses `__` for dots: `train__steps=3`."""
  cfg = demo.get_config()
  for dotted, value in overrides(data_root, **extra):
    *parents, leaf = dotted.split(".")
    node = cfg
    for part in parents:
      node = node[part]
    node[leaf] = value
  return cfg


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(str(v) for v in value)
  return str(value)


def main_command(workdir: pathlib.Path, mode: str, data_root: pathlib.Path, extra_flags: Sequence[str] = (),
                 **extra) -> list[str]:
  """`python -m panoptic_jax.main` with the tiny config and the tests' compilation cache."""
  flags = [f"--config.{k}={_flag_value(v)}" for k, v in overrides(data_root, **extra)]
  return [sys.executable, "-m", "panoptic_jax.main", f"--config={REPO_ROOT / 'configs' / 'demo.py'}",
          f"--workdir={workdir}", f"--mode={mode}", f"--compilation_cache={CACHE_DIR}", *flags, *extra_flags]


def subprocess_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
  return env


def multiprocess_env(num_devices: int) -> dict[str, str]:
  """`subprocess_env` for one process of a multi-process run: also CACHE_HOOK, so that processes other than 0 find
  their compiled programs in the persistent cache in a later run, as process 0 does."""
  env = subprocess_env(num_devices)
  env["PYTHONPATH"] = os.pathsep.join([str(CACHE_HOOK), env["PYTHONPATH"]])
  return env


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def kill(process: subprocess.Popen) -> None:
  """Ends a process this test started (SIGKILL after a grace period)."""
  if process.poll() is None:
    process.send_signal(signal.SIGTERM)
    try:
      process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait(timeout=10)


def read_metrics(workdir: pathlib.Path) -> list[dict[str, float]]:
  path = workdir / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train_metrics(workdir: pathlib.Path) -> dict[int, dict[str, float]]:
  """step -> the train/ scalars logged at that step."""
  return {int(r["step"]): {k: v for k, v in r.items() if k.startswith("train/")}
          for r in read_metrics(workdir) if "train/loss" in r}


def losses(workdir: pathlib.Path) -> dict[int, float]:
  return {step: m["train/loss"] for step, m in train_metrics(workdir).items()}


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def memo(key: str, compute):
  """`compute()` once per session."""
  if key not in _SESSION:
    _SESSION[key] = compute()
  return _SESSION[key]


def run_in_process(workdir, mode: str, devices=None, **extra) -> dict:
  """train.run with the tiny config; `devices` limits the mesh to those devices (the 1-device reference)."""
  cfg = config(tiny_dataset(), **extra)
  with pytest.MonkeyPatch.context() as patch:
    if devices is not None:
      patch.setattr(sharding, "make_mesh", functools.partial(sharding.make_mesh, devices=devices))
    return train.run(cfg, str(workdir), mode)


def one_device_run() -> pathlib.Path:
  """The workdir of the 6-step reference run on a single device (once per session)."""
  def compute():
    workdir = session_dir() / "one_device"
    run_in_process(workdir, "train", devices=jax.devices()[:1], mesh__data=1, mesh__fsdp=1)
    return workdir
  return memo("one_device", compute)


def mesh_8x1_run() -> tuple[pathlib.Path, dict]:
  """The 6-step run on the (8, 1) mesh with evaluation at the end: (workdir, results), once per session."""
  def compute():
    workdir = session_dir() / "mesh_8x1"
    results = run_in_process(workdir, "train_and_eval")
    return workdir, results
  return memo("mesh_8x1", compute)


def assert_close(actual: dict[int, float], expected: dict[int, float], first_steps: int = 3) -> None:
  """Every step of `actual` is in `expected`: its first `first_steps` steps within 1e-5 (issue 5); later ones within a
  relative 1e-4, since float32 reduction-order differences between shardings grow with each update (measured:
  2.5e-5 at step 4 and 2.5e-4 at step 6 between 1 device and (8, 1), losses near 22)."""
  assert actual and set(actual) <= set(expected), (sorted(actual), sorted(expected))
  for i, step in enumerate(sorted(actual)):
    atol = 1e-5 if i < first_steps else 1e-4 * abs(expected[step])
    assert abs(actual[step] - expected[step]) <= atol, (step, actual[step], expected[step], atol)
