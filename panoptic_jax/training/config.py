"""The run configuration: the base that names every field with its default, and the checks made before anything runs.

A recipe (`configs/*.py`) starts from `base_config()` and sets only what differs, like a row of the paper's recipe
table:

    from panoptic_jax.training.config import base_config

    def get_config():
      config = base_config()
      config.model.preset = "kmax_r50_cityscapes"
      config.input.crop_size = (1025, 2049)
      return config

The base is locked: a misspelt field is an error at once (listing the fields that exist), and every field keeps its
type (`--config.train.steps=1e3` is refused). The loss, optimiser and augmentation defaults are those of their
dataclasses (`losses.LossConfig`, `optim.OptimConfig`, `transforms.AugmentConfig`: DeepLab2's kMaX-DeepLab recipe),
so each number is written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from panoptic_jax.data import storage, transforms
from panoptic_jax.errors import UserError
from panoptic_jax.inference import postprocess
from panoptic_jax.model import kmax_deeplab
from panoptic_jax.training import data_health, losses, optim


class ConfigError(UserError, ValueError):
  """An invalid config field; the message names it, what was expected and what was found."""


# The augmentation fields a run config exposes (the rest of `AugmentConfig` is implementation detail).
_INPUT_FIELDS = ("crop_size", "min_scale", "max_scale", "scale_step", "resize_to_crop", "flip_prob", "brightness",
                 "contrast", "saturation", "hue", "copy_paste", "autoaugment")


def base_config() -> ml_collections.ConfigDict:
  """Every field of a run config with its default (locked: fields cannot be added, types cannot change)."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Datasets in the project's format: local folders or s3://bucket/prefix. The endpoint comes from here, or
  # AWS_ENDPOINT_URL_S3; credentials from the standard AWS chain.
  config.dataset = ml_collections.ConfigDict()
  config.dataset.train = ""
  config.dataset.val = ""
  config.dataset.endpoint_url = ""
  # How long an S3 endpoint may fail transiently (refused, reset, 5xx) before the run stops: retries back off, each
  # logged (panoptic_jax/data/storage.py).
  config.dataset.storage_retry_s = storage.DEFAULT_RETRY_BUDGET_S
  config.dataset.synthetic = None  # The demo's generated scenes (configs/demo.py); train / val then point into them.

  config.model = ml_collections.ConfigDict()
  config.model.preset = "kmax_r50_coco"  # Architecture numbers: panoptic_jax/model/kmax_deeplab.py.
  config.model.dtype = "float32"  # "bfloat16": bf16 compute with float32 parameters.
  config.model.remat = False  # Recompute activations per stage in the backward pass (less memory, slower).
  config.model.num_slots = 0  # Mask slots (at most this many segments per image); 0: the preset's (128 / 256).
  # Weights a run starts from when it has no checkpoint of its own: an ImageNet backbone, a published kMaX model or
  # another run's workdir (panoptic_jax/weights/init_from.py). Local path or s3://.
  config.model.init_from = ""
  config.model.init_from_exclude = ""  # A regex: our variables / the file's tensors it matches are not imported.

  augment = transforms.AugmentConfig()
  # input.autoaugment: DeepLab2's photometric policy by name ("" off; data/autoaugment.py lists the two), which its
  # kMaX recipes use instead of the brightness / contrast / saturation / hue jitter.
  config.input = ml_collections.ConfigDict({name: getattr(augment, name) for name in _INPUT_FIELDS})
  config.input.num_workers = -1  # Worker processes decoding and augmenting; 0: threads of the main process; -1: one
  #                                per host core.
  # Training skips a sample whose files fail to decode (named in the log, counted in the metrics) and stops when more
  # than this fraction of the samples were skipped (panoptic_jax/training/data_health.py).
  config.input.max_skipped_fraction = data_health.DEFAULT_MAX_SKIPPED_FRACTION

  config.loss = ml_collections.ConfigDict(dataclasses.asdict(losses.LossConfig()))
  config.optim = ml_collections.ConfigDict(dataclasses.asdict(optim.OptimConfig()))

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 16  # Global batch over all devices and processes.
  config.train.steps = 50_000
  config.train.log_every = 100
  config.train.checkpoint_every = 2000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 5000

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8
  config.eval.postprocess = "coco"  # Merge thresholds and area limits: panoptic_jax/inference/postprocess.py.
  config.eval.max_images = 0  # 0: the whole validation set.
  config.eval.num_visualizations = 4

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: the devices that remain after the other axis.
  config.mesh.fsdp = 1  # > 1 also shards parameters and optimizer state over that many devices.
  config.lock()
  return config


def nearest_crop_sides(side: int) -> tuple[int, int]:
  """The valid crop sides (`MAX_STRIDE * k + 1`) just below and above `side`."""
  stride = kmax_deeplab.MAX_STRIDE
  below = (side - 1) // stride * stride + 1
  return max(below, stride + 1), below + stride if below < side else below


def _check(condition: bool, field: str, expected: str, found: Any) -> None:
  if not condition:
    raise ConfigError(f"config.{field}: expected {expected}, found {found!r}")


def validate(config: ml_collections.ConfigDict, *, needs_train_data: bool = True) -> None:
  """Raises ConfigError for the first invalid field (types are enforced by the locked base already).

  Args:
    config: a run config.
    needs_train_data: whether `dataset.train` must be set (not for evaluating a trained run).
  """
  synthetic = config.dataset.get("synthetic") is not None
  location = "a dataset location (folder or s3://bucket/prefix)"
  _check(synthetic or not needs_train_data or bool(config.dataset.train), "dataset.train", location, "")
  _check(synthetic or bool(config.dataset.val), "dataset.val", location, "")
  _check(config.dataset.storage_retry_s >= 0, "dataset.storage_retry_s", "seconds >= 0",
         config.dataset.storage_retry_s)
  _check(config.model.preset in kmax_deeplab.PRESETS, "model.preset", f"one of {sorted(kmax_deeplab.PRESETS)}",
         config.model.preset)
  _check(config.model.dtype in ("float32", "bfloat16"), "model.dtype", "'float32' or 'bfloat16'", config.model.dtype)
  _check(config.model.num_slots >= 0, "model.num_slots", "0 (the preset's) or a positive number of mask slots",
         config.model.num_slots)
  crop = tuple(config.input.crop_size)
  _check(len(crop) == 2 and all(c > 0 for c in crop), "input.crop_size", "(height, width), two positive integers",
         crop)
  stride = kmax_deeplab.MAX_STRIDE
  for side in crop:
    if (side - 1) % stride:
      low, high = nearest_crop_sides(side)
      raise ConfigError(
          f"config.input.crop_size: expected sides of {stride} * k + 1 pixels (the model's features at every stride "
          f"then lie on the image's pixel grid), found {crop}; the nearest valid sides to {side} are {low} and "
          f"{high}")
  _check(0 < config.input.min_scale <= config.input.max_scale, "input.min_scale / max_scale",
         "0 < min_scale <= max_scale", (config.input.min_scale, config.input.max_scale))
  try:
    augment_config(config)
  except ValueError as e:
    raise ConfigError(f"config.input.{e}") from None
  _check(config.input.num_workers >= -1, "input.num_workers", "-1 (one per core), 0 or a positive count",
         config.input.num_workers)
  _check(0 < config.loss.semantic_topk <= 1, "loss.semantic_topk", "a fraction in (0, 1]", config.loss.semantic_topk)
  for field in ("train.batch_size", "train.steps", "train.log_every", "eval.batch_size"):
    section, name = field.split(".")
    _check(config[section][name] > 0, field, "a positive integer", config[section][name])
  _check(config.optim.warmup_steps < config.train.steps, "optim.warmup_steps",
         f"fewer than train.steps ({config.train.steps})", config.optim.warmup_steps)
  _check(config.eval.postprocess.lower() in postprocess.PRESETS, "eval.postprocess",
         f"one of {sorted(postprocess.PRESETS)}", config.eval.postprocess)


def model_arch(config: ml_collections.ConfigDict) -> kmax_deeplab.KMaXConfig:
  """The architecture a run config names: its preset with the config's dtype, remat and mask slots."""
  overrides = {"dtype": config.model.dtype, "remat": config.model.remat}
  if config.model.num_slots:
    overrides["num_slots"] = config.model.num_slots
  return kmax_deeplab.get_config(config.model.preset, **overrides)


def augment_config(config: ml_collections.ConfigDict) -> transforms.AugmentConfig:
  return transforms.AugmentConfig(**{name: config.input[name] for name in _INPUT_FIELDS})


def from_record(record: dict[str, Any], where: str) -> ml_collections.ConfigDict:
  """A run config rebuilt on the base from the `config` mapping a workdir's config.json records."""
  config = base_config()
  try:
    config.update(record["config"])
  except (KeyError, TypeError, AttributeError) as e:
    raise ConfigError(f"{where}: its config does not fit this version's fields ({e})") from e
  return config
