"""The training input's health: skipped samples named and counted, the stop rule, the mask-slot overflow warning."""

import logging
import shutil

import numpy as np
import pytest

from panoptic_jax.data import pipeline, synthetic, transforms
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.training import data_health, train
from tests.training import train_helpers as th

BATCH = 4


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(root), 8, 1, seed=0, height=64, width=96, num_workers=0, progress=False)
  return Dataset.open(root / "train")


def _window(health, batches):
  """One logging window as the training loop runs it: per step note_batch and the step's counts, then check."""
  history = []
  for step, batch in enumerate(batches, 1):
    health.note_batch(batch)
    history.append((step, {"loss": 1.0, **{k: float(v) for k, v in data_health.batch_counts(batch).items()}}))
  counts = health.take_counts(history)
  assert all(set(metrics) == {"loss"} for _, metrics in history)  # Counts leave the averaged metrics.
  return counts, health.check(len(batches), counts, len(batches))


def _warnings(caplog, text):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_mask_slot_overflow_is_warned_once_with_the_count_and_the_setting(train_set, caplog):
  augment = transforms.AugmentConfig(crop_size=(65, 97), min_scale=1, max_scale=1)
  config = pipeline.PipelineConfig(batch_size=BATCH, augment=augment, num_mask_slots=2, output_stride=4, read_threads=1,
                                   prefetch_batches=1)
  health = data_health.InputHealth(train_set, BATCH)
  iterator = pipeline.make_train_iterator(train_set, config, 0, 1)
  with caplog.at_level(logging.WARNING):
    batches = [next(iterator) for _ in range(2)]
    counts = [_window(health, [batch]) for batch in batches]  # Two logging windows of one step each.
  assert all(problem is None for _, problem in counts)
  for batch, (window, _) in zip(batches, counts):
    assert window["images_with_dropped_segments"] == (batch["dropped_segments"] > 0).sum() > 0
    assert window["dropped_segments"] == batch["dropped_segments"].sum()
  assert len(caplog.records) == 1, caplog.text  # Nothing per image, nothing per later window below 10 images.
  message = caplog.records[0].getMessage()
  first = counts[0][0]
  assert (f"{first['images_with_dropped_segments']:.0f} of the {BATCH} training samples so far had more segments "
          "than the 2 mask slots") in message
  assert f"{first['dropped_segments']:.0f} segments were dropped" in message
  assert "--config.model.num_slots" in message


def test_overflow_warning_repeats_only_at_powers_of_ten(train_set, caplog):
  health = data_health.InputHealth(train_set, 100)
  with caplog.at_level(logging.WARNING):
    for images in (0, 3, 5, 1, 1, 80, 9, 2):  # Totals 0, 3, 8, 9, 10, 90, 99, 101.
      health.check(1, {"images_with_dropped_segments": images, "dropped_segments": 2 * images}, 1)
  assert [m.split(" of the ")[0] for m in _warnings(caplog, "mask slots")] == ["3", "10", "101"]


def test_skipped_samples_are_named_once_and_counted(train_set, caplog):
  health = data_health.InputHealth(train_set, BATCH)
  batch = {"valid": np.array([True, False, True, False]), "index": np.array([0, 5, 1, 6], np.int32),
           "dropped_segments": np.zeros(BATCH, np.int32)}
  with caplog.at_level(logging.WARNING):
    counts, problem = _window(health, [batch, batch, batch])
  assert counts == {"skipped_samples": 6, "dropped_segments": 0, "images_with_dropped_segments": 0}
  assert problem is None and (health.skipped, health.seen) == (6, 12)
  for name in ("000005", "000006"):
    named = _warnings(caplog, f"Skipped training sample '{name}'")
    assert len(named) == 1 and f"images/{name}.jpg" in named[0] and f"panoptic_maps/{name}.tif" in named[0]
  assert len(caplog.records) == 2


@pytest.mark.parametrize("fraction,seen,skipped,stops", [
    (0.01, 8, 8, False),        # All of the first 8 bad: within the floor of 10.
    (0.01, 16, 11, True),       # Past the floor.
    (0.01, 2000, 20, False),    # 1% of 2000.
    (0.01, 2000, 21, True),
    (0.0, 100, 1, True),        # 0: the first skipped sample stops.
    (1.0, 16, 16, False),       # 1: never.
])
def test_the_stop_rule(train_set, fraction, seen, skipped, stops):
  health = data_health.InputHealth(train_set, seen, max_skipped_fraction=fraction)
  problem = health.check(7, {"skipped_samples": skipped}, 1)
  assert (problem is not None) == stops
  if stops:
    assert f"{skipped} of the {seen} training samples read up to step 7 failed to decode" in problem
    assert "config.input.max_skipped_fraction" in problem and "data.validate" in problem


def test_the_threshold_must_be_a_fraction(train_set):
  with pytest.raises(ValueError, match=r"config.input.max_skipped_fraction: expected a fraction in \[0, 1\].*1.5"):
    data_health.InputHealth(train_set, BATCH, max_skipped_fraction=1.5)



# ----------------------------------------------------------------------------------------------------------------------
# Training runs: the tiny model of train_helpers, 6 steps of 8 images on the (8, 1) mesh, over 16 training images


def _broken_copy(root, truncated_images=(), truncated_maps=()):
  """The tiny training set with some images and annotation TIFFs cut in half."""
  shutil.copytree(th.tiny_dataset() / "train", root / "train")
  paths = ([root / "train" / "images" / f"{name}.jpg" for name in truncated_images]
           + [root / "train" / "panoptic_maps" / f"{name}.tif" for name in truncated_maps])
  for path in paths:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  return root


@pytest.mark.slow
def test_training_skips_a_truncated_jpeg_and_a_corrupt_tiff_names_and_counts_them(tmp_path, caplog):
  data_root = _broken_copy(tmp_path / "data", truncated_images=["000003"], truncated_maps=["000011"])
  with caplog.at_level(logging.WARNING):
    train.run(th.config(data_root), str(tmp_path / "run"), "train")
  metrics = th.train_metrics(tmp_path / "run")
  assert sorted(metrics) == list(range(1, th.STEPS + 1))
  assert all(np.isfinite(m["train/loss"]) for m in metrics.values())
  # 6 steps of 8 are 3 epochs of the 16 images: each bad file is skipped once an epoch.
  assert sum(m["train/skipped_samples"] for m in metrics.values()) == 2 * 3
  for name, bad in (("000003", "images/000003.jpg"), ("000011", "panoptic_maps/000011.tif")):
    named = _warnings(caplog, f"Skipped training sample '{name}'")
    assert len(named) == 1 and bad in named[0], caplog.text
    assert any(f"{bad}: cannot decode" in m for m in _warnings(caplog, "cannot decode")), caplog.text  # The error.
  assert th.checkpoint_steps(tmp_path / "run")[-1] == th.STEPS


@pytest.mark.slow
def test_training_stops_when_too_many_samples_fail_to_decode(tmp_path):
  data_root = _broken_copy(tmp_path / "data", truncated_images=[f"{i:06d}" for i in range(12)])  # 12 of 16 images.
  with pytest.raises(train.TrainingError, match=r"12 of the 16 training samples read up to step 2 failed to decode "
                     r"and were skipped, more than config.input.max_skipped_fraction=0.5 allows"):
    train.run(th.config(data_root, input__max_skipped_fraction=0.5), str(tmp_path / "run"), "train")
  # Step 1 (at most 8 skipped of 8) is within the floor of 10; step 2 completes the epoch: 12 > max(0.5 * 16, 10).
  metrics = th.train_metrics(tmp_path / "run")
  assert sorted(metrics) == [1, 2] and sum(m["train/skipped_samples"] for m in metrics.values()) == 12
