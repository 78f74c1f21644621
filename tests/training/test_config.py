"""The run config: every shipped recipe validates; broken fields are named before anything compiles."""

import dataclasses
import importlib.util
import pathlib

import pytest

from panoptic_jax.data import transforms
from panoptic_jax.training import config as config_lib
from panoptic_jax.training import losses, optim

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
  config_lib.validate(config)


def test_defaults_come_from_the_dataclasses_of_losses_optimiser_and_augmentation():
  config = config_lib.base_config()
  assert config.loss.to_dict() == dataclasses.asdict(losses.LossConfig())
  assert config.optim.to_dict() == dataclasses.asdict(optim.OptimConfig())
  assert config_lib.augment_config(config) == transforms.AugmentConfig()


def test_the_base_is_locked_against_misspelt_fields_and_wrong_types():
  config = config_lib.base_config()
  with pytest.raises(AttributeError, match='Did you mean "steps"'):
    config.train.stpes = 10
  with pytest.raises(TypeError, match="train|steps|int"):
    config.train.steps = "10"


def _coco():
  config = _load(CONFIGS[0].parent / "coco.py")
  config.dataset.train, config.dataset.val = "data/train", "data/val"
  return config


@pytest.mark.parametrize("field,value,message", [
    ("model.dtype", "float16", r"config.model.dtype: expected 'float32' or 'bfloat16'"),
    ("model.preset", "kmax_r51", r"config.model.preset: expected one of \[.*kmax_r50_coco"),
    ("input.crop_size", (641,), r"config.input.crop_size: expected \(height, width\)"),
    ("input.crop_size", (64, 64), r"config.input.crop_size: expected sides of 32 \* k \+ 1 pixels.*found \(64, 64\); "
                                  r"the nearest valid sides to 64 are 33 and 65"),
    ("input.crop_size", (65, 65, 97, 97), r"config.input.crop_size: expected \(height, width\)"),
    ("optim.warmup_steps", 10**9, r"config.optim.warmup_steps: expected fewer than train.steps"),
    ("dataset.train", "", r"config.dataset.train: expected a dataset location"),
    ("eval.postprocess", "kitti", r"config.eval.postprocess: expected one of"),
])
def test_invalid_fields_are_named(field, value, message):
  config = _coco()
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)


def test_evaluating_a_trained_run_needs_no_training_set():
  config = _coco()
  config.dataset.train = ""
  config_lib.validate(config, needs_train_data=False)


def test_model_arch_applies_dtype_remat_and_mask_slots():
  config = _coco()
  default = config_lib.model_arch(config)
  assert (default.num_slots, default.dtype, default.remat) == (128, "bfloat16", True)
  config.model.num_slots = 64
  config.model.dtype = "float32"
  config.model.remat = False
  arch = config_lib.model_arch(config)
  assert (arch.num_slots, arch.dtype, arch.remat) == (64, "float32", False)
