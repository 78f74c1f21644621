"""Grain pipelines: determinism, resume, workers, process sharding, epochs, eval coverage, batch contract."""

import dataclasses
import shutil

import numpy as np
import pytest

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import pipeline, synthetic, transforms
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.source import PanopticSource

NUM_TRAIN, NUM_VAL = 12, 5
CONFIG = pipeline.PipelineConfig(batch_size=4, augment=transforms.AugmentConfig(crop_size=(33, 49)), num_mask_slots=24,
                                 output_stride=4, seed=3, read_threads=1, prefetch_batches=1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(root), NUM_TRAIN, NUM_VAL, seed=0, height=64, width=96, num_workers=0, progress=False)
  return root


@pytest.fixture(scope="module")
def train_set(data_root):
  return Dataset.open(data_root / "train")


@pytest.fixture(scope="module")
def val_set(data_root):
  return Dataset.open(data_root / "val")


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_contract(train_set):
  batch = next(pipeline.make_train_iterator(train_set, CONFIG, 0, 1))
  expected = {"image": ((4, 33, 49, 3), np.uint8), "panoptic": ((4, 33, 49), np.int32),
              "semantic": ((4, 9, 13), np.int32), "slot_ids": ((4, 9, 13), np.int32),
              "slot_classes": ((4, 24), np.int32), "dropped_segments": ((4,), np.int32), "valid": ((4,), np.bool_),
              "index": ((4,), np.int32)}
  assert {k: (v.shape, v.dtype.type) for k, v in batch.items()} == expected
  assert batch["valid"].all()
  # Targets agree with the full-resolution map.
  small = batch["panoptic"][:, ::4, ::4]
  np.testing.assert_array_equal(batch["semantic"], np.where(small < 0, -1, small // 1000))
  np.testing.assert_array_equal(batch["slot_ids"] >= 0, small >= 0)


def test_same_seed_same_batches_other_seed_differs(train_set):
  a = _take(pipeline.make_train_iterator(train_set, CONFIG, 0, 1), 3)
  b = _take(pipeline.make_train_iterator(PanopticSource(train_set), CONFIG, 0, 1), 3)
  _assert_same(a, b)
  other = pipeline.PipelineConfig(**{**CONFIG.__dict__, "seed": 4})
  c = _take(pipeline.make_train_iterator(train_set, other, 0, 1), 3)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


def test_epochs_cover_the_dataset_and_reshuffle(train_set):
  batches = _take(pipeline.make_train_iterator(train_set, CONFIG, 0, 1), 2 * NUM_TRAIN // 4)
  order = np.concatenate([b["index"] for b in batches])
  first, second = order[:NUM_TRAIN], order[NUM_TRAIN:]
  assert sorted(first) == sorted(second) == list(range(NUM_TRAIN))
  assert not np.array_equal(first, second)


def test_resume_without_workers(train_set):
  reference = _take(pipeline.make_train_iterator(train_set, CONFIG, 0, 1), 5)
  it = pipeline.make_train_iterator(train_set, CONFIG, 0, 1)
  _take(it, 2)
  state = it.get_state()
  resumed = pipeline.make_train_iterator(train_set, CONFIG, 0, 1)
  resumed.set_state(state)
  _assert_same(_take(resumed, 3), reference[2:])


@pytest.mark.slow
def test_workers_give_the_same_batches_and_resume(train_set):
  reference = _take(pipeline.make_train_iterator(train_set, CONFIG, 0, 1), 5)
  with_workers = pipeline.PipelineConfig(**{**CONFIG.__dict__, "num_workers": 2})
  it = pipeline.make_train_iterator(train_set, with_workers, 0, 1)
  try:
    _assert_same(_take(it, 3), reference[:3])
    state = it.get_state()
  finally:
    it.close()
  resumed = pipeline.make_train_iterator(train_set, with_workers, 0, 1)
  try:
    resumed.set_state(state)
    _assert_same(_take(resumed, 2), reference[3:])
  finally:
    resumed.close()


def test_process_shards_are_disjoint_and_rebuild_the_global_batch(train_set):
  global_batches = _take(pipeline.make_train_iterator(train_set, CONFIG, 0, 1), 3)
  shards = [_take(pipeline.make_train_iterator(train_set, CONFIG, p, 2), 3) for p in range(2)]
  seen = []
  for step, global_batch in enumerate(global_batches):
    parts = [shards[p][step] for p in range(2)]
    assert all(len(part["index"]) == 2 for part in parts)
    # Process p holds rows 2p, 2p + 1 of each global batch: concatenating the shards in process order (what
    # jax.make_array_from_process_local_data does) rebuilds the batch, same order and augmentation.
    for key in global_batch:
      rebuilt = np.concatenate([parts[0][key], parts[1][key]])
      np.testing.assert_array_equal(rebuilt, global_batch[key], err_msg=key)
    seen += [set(parts[0]["index"].tolist()), set(parts[1]["index"].tolist())]
  # Within the first epoch (12 images, 3 global batches of 4) the two processes never share an image.
  p0 = set().union(*seen[0::2])
  p1 = set().union(*seen[1::2])
  assert not p0 & p1 and p0 | p1 == set(range(NUM_TRAIN))


def test_batch_size_must_divide_over_processes(train_set):
  with pytest.raises(ValueError, match="does not divide evenly over 3 processes"):
    pipeline.make_train_iterator(train_set, CONFIG, 0, 3)


@pytest.mark.parametrize("process_count,batch_size", [(1, 4), (2, 4), (3, 3), (2, 2)])
def test_eval_covers_every_image_exactly_once(val_set, process_count, batch_size):
  config = pipeline.PipelineConfig(**{**CONFIG.__dict__, "eval_batch_size": batch_size})
  per_process = [list(pipeline.make_eval_iterator(val_set, config, p, process_count)) for p in range(process_count)]
  expected_batches = pipeline.num_eval_batches(len(val_set), config, process_count)
  assert all(len(batches) == expected_batches for batches in per_process)
  valid_indices = []
  for batches in per_process:
    for batch in batches:
      assert batch["image"].shape == (batch_size // process_count, 33, 49, 3)
      assert ((batch["index"] >= 0) == batch["valid"]).all()
      assert (batch["slot_classes"][~batch["valid"]] == -1).all()
      assert (batch["panoptic"][~batch["valid"]] == -1).all()
      valid_indices += batch["index"][batch["valid"]].tolist()
  assert sorted(valid_indices) == list(range(NUM_VAL))


def test_eval_batch_fields(val_set):
  batch = next(pipeline.make_eval_iterator(val_set, CONFIG, 0, 1))
  np.testing.assert_array_equal(batch["original_hw"], [[64, 96]] * 4)
  np.testing.assert_array_equal(batch["content_hw"], [[33, 49]] * 4)  # scale min(33/64, 49/96) = 0.5104
  np.testing.assert_array_equal(batch["index"], [0, 1, 2, 3])


def test_invalid_config_names_the_field():
  with pytest.raises(ValueError, match="PipelineConfig.batch_size"):
    pipeline.PipelineConfig(batch_size=0)


def test_s3_train_batches_equal_local_with_workers(s3_bucket, s3_server, data_root, train_set):
  fs = s3_server.filesystem()
  fs.put(str(data_root / "train") + "/", f"{s3_bucket}/train/", recursive=True)
  s3_set = Dataset.open(f"s3://{s3_bucket}/train", endpoint_url=s3_server.endpoint_url)
  assert s3_set.names == train_set.names
  reference = _take(pipeline.make_train_iterator(train_set, CONFIG, 0, 1), 2)
  it = pipeline.make_train_iterator(s3_set, pipeline.PipelineConfig(**{**CONFIG.__dict__, "num_workers": 1}), 0, 1)
  try:
    _assert_same(_take(it, 2), reference)
  finally:
    it.close()


# ----------------------------------------------------------------------------------------------------------------------
# Undecodable files


@pytest.fixture(scope="module")
def broken_train_set(data_root, tmp_path_factory):
  """The train set with images/000003.jpg cut in half (a truncated JPEG) and panoptic_maps/000007.tif cut in half."""
  root = tmp_path_factory.mktemp("broken") / "train"
  shutil.copytree(data_root / "train", root)
  for path in (root / "images" / "000003.jpg", root / "panoptic_maps" / "000007.tif"):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  return Dataset.open(root)


def _one_epoch_rows(iterator) -> dict[int, dict]:
  """index -> that element's row of every key, over the first epoch."""
  rows = {}
  for batch in _take(iterator, NUM_TRAIN // 4):
    for i, index in enumerate(batch["index"].tolist()):
      rows[index] = {key: value[i] for key, value in batch.items()}
  assert sorted(rows) == list(range(NUM_TRAIN))
  return rows


@pytest.mark.parametrize("num_workers", [0, 1])
def test_undecodable_training_samples_become_invalid_blanks(train_set, broken_train_set, num_workers, caplog):
  bad = {3: "images/000003.jpg", 7: "panoptic_maps/000007.tif"}
  config = pipeline.PipelineConfig(**{**CONFIG.__dict__, "num_workers": num_workers})
  reference = _one_epoch_rows(pipeline.make_train_iterator(train_set, CONFIG, 0, 1))
  it = pipeline.make_train_iterator(broken_train_set, config, 0, 1)
  try:
    with caplog.at_level("WARNING"):
      rows = _one_epoch_rows(it)
  finally:
    if num_workers:
      it.close()
  for index, row in rows.items():
    if index in bad:  # Same keys, shapes and dtypes as any element; all void, no slots, left out of the losses.
      assert not row["valid"]
      assert {k: (v.shape, v.dtype) for k, v in row.items()} == {k: (v.shape, v.dtype)
                                                                  for k, v in reference[index].items()}
      assert (row["panoptic"] == -1).all() and (row["semantic"] == -1).all() and (row["slot_ids"] == -1).all()
      assert (row["slot_classes"] == -1).all() and (row["image"] == transforms.PAD_PIXEL).all()
    else:  # Every other sample is exactly what the intact dataset gives: same order, same augmentation.
      assert row["valid"]
      for key in row:
        np.testing.assert_array_equal(row[key], reference[index][key], err_msg=f"{index} {key}")
  if not num_workers:  # Worker processes log to their own stderr.
    for path in bad.values():
      assert sum(f"{path}: cannot decode" in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_undecodable_eval_image_raises_naming_the_file(broken_train_set):
  with pytest.raises(fmt.FormatError, match=r"images/000003\.jpg: cannot decode as an image.*data\.validate"):
    list(pipeline.make_eval_iterator(broken_train_set, CONFIG, 0, 1))


def test_copy_paste_is_reproducible_and_resumable(train_set):
  config = dataclasses.replace(CONFIG, augment=dataclasses.replace(CONFIG.augment, copy_paste=True))
  reference = _take(pipeline.make_train_iterator(train_set, config, 0, 1), 4)
  plain = _take(pipeline.make_train_iterator(train_set, CONFIG, 0, 1), 4)
  assert any((a["image"] != b["image"]).any() for a, b in zip(reference, plain))
  it = pipeline.make_train_iterator(train_set, config, 0, 1)
  _take(it, 2)
  resumed = pipeline.make_train_iterator(train_set, config, 0, 1)
  resumed.set_state(it.get_state())
  _assert_same(_take(resumed, 2), reference[2:])
