"""Every shipped config validates; broken fields are named before anything compiles."""

import importlib.util
import pathlib

import pytest

from panoptic_jax.training import config_validation

CONFIGS = sorted((pathlib.Path(__file__).parents[2] / "configs").glob("*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate_once_datasets_are_set(path):
  config = _load(path)
  config.dataset.train = config.dataset.train or "data/train"
  config.dataset.val = config.dataset.val or "data/val"
  config_validation.validate(config)


@pytest.mark.parametrize("field,value,message", [
    ("train.batch_size", "8", r"config.train.batch_size: expected int, found '8'"),
    ("model.dtype", "float16", r"config.model.dtype: expected 'float32' or 'bfloat16'"),
    ("input.crop_size", (641,), r"config.input.crop_size"),
    ("optim.warmup_steps", 10**9, r"config.optim.warmup_steps: expected fewer than train.steps"),
    ("dataset.train", "", r"config.dataset.train: expected a dataset location"),
])
def test_invalid_fields_are_named(field, value, message):
  config = _load(CONFIGS[0].parent / "coco.py")
  config.dataset.train, config.dataset.val = "data/train", "data/val"
  section, name = field.split(".")
  with config[section].ignore_type():
    config[section][name] = value
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate(config)


def test_missing_field_is_named():
  config = _load(CONFIGS[0].parent / "coco.py")
  del config.optim["eps"]
  with pytest.raises(config_validation.ConfigError, match=r"config.optim.eps: missing"):
    config_validation.validate(config)
