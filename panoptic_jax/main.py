r"""Entry point: train and / or evaluate kMaX-DeepLab.

  python -m panoptic_jax.main --config=configs/coco.py --workdir=runs/coco_r50 [--mode=train_and_eval]
      [--config.train.batch_size=16 ...]
  python -m panoptic_jax.main --workdir=runs/coco_r50 [--mode=eval] [--config.eval.batch_size=4 ...]

Without --config, a workdir that holds a run uses that run's own configuration (its config.json): resuming,
evaluating or extending a run needs nothing but the workdir, and the overrides that are safe for a trained run
(evaluation, logging, checkpointing, devices) can still be given.

Several processes (TPU pods, multi-node GPUs, or local CPU processes in tests) run the same command; pass
`--coordinator_address`, `--num_processes` and `--process_id`, or `--multihost` to let `jax.distributed` detect
them (TPU VMs, SLURM).
"""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from panoptic_jax import cli
from panoptic_jax.training import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py); default: the workdir's own (its config.json).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.", required=True)
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                          "train: train only; eval: evaluate the newest checkpoint; train_and_eval: both.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Initialise jax.distributed from the environment (TPU, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_CACHE_DIR = flags.DEFINE_string("compilation_cache", cli.COMPILATION_CACHE,
                                 "Persistent XLA compilation cache ('' disables it).")

# Loads a workdir's own config (the `path:argument` form of --config passes the workdir to its get_config).
_WORKDIR_CONFIG = pathlib.Path(__file__).parent / "training" / "workdir_config.py"


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def with_workdir_config(argv: list[str]) -> list[str]:
  """`--config` defaults to the workdir's own config when the workdir holds a run."""
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  workdir = _flag_value(argv, "workdir")
  if workdir is None or workdir_lib.Workdir(workdir).read_run() is None:
    return argv
  return argv[:1] + [f"--config={_WORKDIR_CONFIG}:{workdir}"] + argv[1:]


class _QuietLibraries:
  """Keeps Orbax's per-save INFO chatter off the console (its warnings and errors still show)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from panoptic_jax.training import config as config_lib
  from panoptic_jax.training import train

  config = _CONFIG.value
  if config is None:
    raise app.UsageError(f"--config is required: {_WORKDIR.value} holds no run yet (no config.json); e.g. "
                         "--config=configs/demo.py")
  config_lib.validate(config, needs_train_data=_MODE.value != "eval")  # Before anything compiles or reads data.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  cli.initialise_jax(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _MULTIHOST.value,
                     _CACHE_DIR.value)
  train.run(config, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  # A CPU step's temporaries then stay mapped between steps (panoptic_jax/host_memory.py).
  cli.run_absl(main, argv_hook=with_workdir_config, malloc_tunables=True, inline_dispatch=True)
