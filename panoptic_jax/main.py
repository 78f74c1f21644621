r"""Entry point: train and / or evaluate kMaX-DeepLab from a config file.

  python -m panoptic_jax.main --config=configs/coco.py --workdir=runs/coco_r50 [--mode=train_and_eval]
      [--config.train.batch_size=16 ...]

Several processes (TPU pods, multi-node GPUs, or local CPU processes in tests) run the same command; pass
`--coordinator_address`, `--num_processes` and `--process_id`, or `--multihost` to let `jax.distributed` detect
them (TPU VMs, SLURM).
"""

import pathlib

from absl import app, flags, logging
from ml_collections import config_flags

from panoptic_jax import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and pictures.", required=True)
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                          "train: train only; eval: evaluate the newest checkpoint; train_and_eval: both.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Initialise jax.distributed from the environment (TPU, SLURM).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_CACHE_DIR = flags.DEFINE_string("compilation_cache", "~/.cache/panoptic_jax/jax_compilation",
                                 "Persistent XLA compilation cache ('' disables it).")


def _initialise_jax() -> None:
  import jax  # Imported here so that flags such as XLA_FLAGS set by launch scripts apply first.

  host_memory.run_cpu_executions_inline()  # A CPU step's temporaries then stay mapped between steps.
  if _COORDINATOR.value:
    # Cross-process collectives between CPU devices (local multi-process runs); no effect on GPU / TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _MULTIHOST.value:
    jax.distributed.initialize()
  if _CACHE_DIR.value:
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(_CACHE_DIR.value).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())


class _QuietLibraries:
  """Keeps Orbax's per-save INFO chatter off the console (its warnings and errors still show)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from panoptic_jax.training import config_validation, train

  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  config_validation.validate(config)  # Before anything compiles or touches the data.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  _initialise_jax()
  train.run(config, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  host_memory.relaunch_with_malloc_tunables()  # Before anything starts threads: the process image is replaced.
  app.run(main)
