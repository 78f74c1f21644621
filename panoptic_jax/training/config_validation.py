"""Checks a training config before anything compiles: every error names the field, what was expected and found."""

from typing import Any

import ml_collections


class ConfigError(ValueError):
  """An invalid config field."""


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "seed": int,
    "dataset.train": str, "dataset.val": str, "dataset.endpoint_url": str,
    "model.preset": str, "model.dtype": str, "model.remat": bool,
    "input.crop_size": (tuple, list), "input.min_scale": (int, float), "input.max_scale": (int, float),
    "input.num_workers": int, "input.resize_to_crop": bool,
    "loss.pq_weight": (int, float), "loss.mask_id_weight": (int, float), "loss.instance_weight": (int, float),
    "loss.semantic_weight": (int, float), "loss.instance_temperature": (int, float), "loss.instance_sample_k": int,
    "loss.semantic_topk": (int, float),
    "optim.base_lr": (int, float), "optim.warmup_steps": int, "optim.poly_power": (int, float),
    "optim.weight_decay": (int, float), "optim.backbone_multiplier": (int, float),
    "optim.b1": (int, float), "optim.b2": (int, float), "optim.eps": (int, float),
    "train.batch_size": int, "train.steps": int, "train.log_every": int, "train.checkpoint_every": int,
    "train.keep_checkpoints": int, "train.eval_every": int,
    "eval.batch_size": int, "eval.postprocess": str, "eval.max_images": int, "eval.num_visualizations": int,
    "mesh.data": int, "mesh.fsdp": int,
}


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ConfigError(f"config.{dotted}: missing (every config needs it; see configs/custom.py)")
    node = node[part]
  return node


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first missing or invalid field."""
  for field, types in _REQUIRED.items():
    value = _lookup(config, field)
    if not isinstance(value, types) or (types is int and isinstance(value, bool)):
      expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
      raise ConfigError(f"config.{field}: expected {expected}, found {value!r} ({type(value).__name__})")

  if not config.dataset.train and config.dataset.get("synthetic") is None:
    raise ConfigError("config.dataset.train: expected a dataset location (folder or s3://bucket/prefix), found ''")
  if not config.dataset.val and config.dataset.get("synthetic") is None:
    raise ConfigError("config.dataset.val: expected a dataset location (folder or s3://bucket/prefix), found ''")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype: expected 'float32' or 'bfloat16', found {config.model.dtype!r}")
  crop = tuple(config.input.crop_size)
  if len(crop) != 2 or not all(isinstance(c, int) and c > 0 for c in crop):
    raise ConfigError(f"config.input.crop_size: expected (height, width) positive integers, found {crop}")
  if not 0 < config.input.min_scale <= config.input.max_scale:
    raise ConfigError(f"config.input: expected 0 < min_scale <= max_scale, found {config.input.min_scale} and "
                      f"{config.input.max_scale}")
  if not 0 < config.loss.semantic_topk <= 1:
    raise ConfigError(f"config.loss.semantic_topk: expected a fraction in (0, 1], found {config.loss.semantic_topk}")
  for field in ("train.batch_size", "train.steps", "eval.batch_size", "train.log_every"):
    if _lookup(config, field) <= 0:
      raise ConfigError(f"config.{field}: expected a positive integer, found {_lookup(config, field)}")
  if config.optim.warmup_steps >= config.train.steps:
    raise ConfigError(f"config.optim.warmup_steps: expected fewer than train.steps ({config.train.steps}), found "
                      f"{config.optim.warmup_steps}")
