"""Dataset listing, pairing and reading, on a local folder and on the real S3 server."""

import logging
import pickle

import numpy as np
import pytest

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.dataset import Dataset, Example
from panoptic_jax.data.storage import StorageError, open_storage

INFO = fmt.DatasetInfo(("person", "car", "sky", "road"), ((220, 20, 60), (0, 0, 142), (70, 130, 180), (128, 64, 128)),
                       (True, True, False, False), "panoptic_maps")


def _panoptic(hw, seed):
  rng = np.random.default_rng(seed)
  h, w = hw
  panoptic = np.full(hw, 2 * INFO.label_divisor, np.int32)  # sky
  panoptic[h // 2:] = 3 * INFO.label_divisor  # road
  panoptic[: h // 4, : w // 4] = fmt.VOID
  for k in range(int(rng.integers(1, 5))):  # Disjoint boxes; instances numbered 1..K per category (canonical).
    y, x = int(rng.integers(0, h - 4)), 5 * k
    panoptic[y:y + 4, x:x + 4] = (k % 2) * INFO.label_divisor + k // 2 + 1  # person / car
  return panoptic


def write_example(storage, stem, hw=(16, 24), seed=0, downscale=1, ext=".png", annotation=True, image=True):
  panoptic = _panoptic(hw, seed)
  if image:
    storage.write_bytes(f"images/{stem}{ext}", fmt.encode_image(np.full(hw + (3,), seed % 256, np.uint8), ext))
  if annotation:
    storage.write_bytes(f"panoptic_maps/{stem}.tif", fmt.encode_annotation(panoptic, INFO, downscale))
  return panoptic


def write_dataset(storage):
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(INFO).encode())
  write_example(storage, "000", seed=0)
  write_example(storage, "001", seed=1, downscale=2, ext=".jpg")
  write_example(storage, "002", seed=2, ext=".PNG")
  write_example(storage, "only_image", annotation=False)
  write_example(storage, "only_annotation", image=False)
  storage.write_bytes("images/notes.txt", b"not an image")
  storage.write_bytes("images/sub/003.png", fmt.encode_image(np.zeros((16, 24, 3), np.uint8), ".png"))
  storage.write_bytes("panoptic_maps/sub/003.tif", fmt.encode_annotation(_panoptic((16, 24), 3), INFO))


@pytest.fixture
def local_dataset(tmp_path):
  write_dataset(open_storage(tmp_path))
  return tmp_path


def _check(ds):
  assert ds.examples == [Example("000", "images/000.png", "panoptic_maps/000.tif"),
                         Example("001", "images/001.jpg", "panoptic_maps/001.tif"),
                         Example("002", "images/002.PNG", "panoptic_maps/002.tif")]
  assert ds.unpaired_images == ["images/only_image.png"]
  assert ds.unpaired_annotations == ["panoptic_maps/only_annotation.tif"]
  assert (ds.num_images, ds.num_annotations, len(ds)) == (4, 4, 3)
  assert ds.info == INFO
  for i, seed in enumerate([0, 1, 2]):
    ex = ds.read_example(i)
    assert ex["name"] == f"00{i}" and ex["image"].shape == (16, 24, 3) and ex["image"].dtype == np.uint8
    assert ex["panoptic"].dtype == np.int32 and ex["panoptic"].shape == (16, 24)
    np.testing.assert_array_equal(ds.read_panoptic(i), ex["panoptic"])
    if i != 1:  # 001 was stored at half size: nearest down and up loses detail.
      np.testing.assert_array_equal(ex["panoptic"], _panoptic((16, 24), seed))
  assert ds.read_panoptic(1, image_hw=(8, 12)).shape == (8, 12)


def test_local_pairing_and_reading(local_dataset, caplog):
  with caplog.at_level(logging.WARNING):
    ds = Dataset.open(local_dataset)
  _check(ds)
  assert "1 of 4 images have no annotation" in caplog.text and "only_image.png" in caplog.text
  assert "1 of 4 annotations have no image" in caplog.text and "only_annotation.tif" in caplog.text
  assert pickle.loads(pickle.dumps(ds)).read_example(0)["name"] == "000"


def test_s3_gives_the_same_examples(local_dataset, s3_root):
  storage = open_storage(f"s3://{s3_root}/ds")
  for path in sorted(local_dataset.rglob("*")):
    if path.is_file():
      storage.write_bytes(str(path.relative_to(local_dataset)), path.read_bytes())
  local, remote = Dataset.open(local_dataset), Dataset.open(f"s3://{s3_root}/ds")
  _check(remote)
  assert remote.examples == local.examples and remote.unpaired_images == local.unpaired_images
  for i in range(len(local)):
    a, b = local.read_example(i), remote.read_example(i)
    np.testing.assert_array_equal(a["panoptic"], b["panoptic"])
    np.testing.assert_array_equal(a["image"], b["image"])


def test_without_images_lists_annotations(tmp_path):
  storage = open_storage(tmp_path)
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(INFO).encode())
  expected = write_example(storage, "a", image=False)
  write_example(storage, "b", image=False, downscale=2)
  with pytest.raises(StorageError, match=rf"no images found directly inside {tmp_path}/images/"):
    Dataset.open(tmp_path)
  ds = Dataset.open(tmp_path, require_images=False)
  assert ds.names == ["a", "b"] and ds.unpaired_annotations == [] and ds.unpaired_images == []
  ex = ds.read_example(0)
  assert ex["image"] is None
  np.testing.assert_array_equal(ex["panoptic"], expected)
  assert ds.read_panoptic(1).shape == (8, 12)  # No image: the map keeps its own size.


def test_images_without_any_annotation_are_kept_for_prediction(tmp_path):
  storage = open_storage(tmp_path)
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(INFO).encode())
  write_example(storage, "a", annotation=False)
  ds = Dataset.open(tmp_path)
  assert len(ds) == 0 and ds.unpaired_images == ["images/a.png"]


def test_ambiguous_stems(local_dataset):
  open_storage(local_dataset).write_bytes("images/000.jpg", b"")
  with pytest.raises(fmt.FormatError, match=r"images: 1 file names are ambiguous .*000\.jpg, 000\.png"):
    Dataset.open(local_dataset)


def test_annotation_folder_from_metadata(tmp_path):
  storage = open_storage(tmp_path)
  info = fmt.DatasetInfo(INFO.categories, INFO.colors, INFO.is_thing, "labels")
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(info).encode())
  write_example(storage, "a")  # Written to panoptic_maps/, which this metadata does not name.
  storage.write_bytes("labels/b.tiff", fmt.encode_annotation(_panoptic((16, 24), 0), info))
  storage.write_bytes("images/b.png", fmt.encode_image(np.zeros((16, 24, 3), np.uint8), ".png"))
  ds = Dataset.open(tmp_path)
  assert ds.examples == [Example("b", "images/b.png", "labels/b.tiff")] and ds.unpaired_images == ["images/a.png"]


def test_bad_annotation_names_file(local_dataset):
  open_storage(local_dataset).write_bytes("panoptic_maps/000.tif", b"garbage")
  ds = Dataset.open(local_dataset)
  with pytest.raises(fmt.FormatError, match=rf"{local_dataset}/panoptic_maps/000\.tif: cannot decode as TIFF"):
    ds.read_example(0)


def test_malformed_metadata_names_file(local_dataset):
  open_storage(local_dataset).write_bytes("metadata.yaml", b"task: detection\n")
  with pytest.raises(fmt.FormatError, match=rf"{local_dataset}/metadata\.yaml: task: expected"):
    Dataset.open(local_dataset)


def test_a_dataset_in_another_label_space_decodes_its_categories_by_name(local_dataset, tmp_path):
  """A validation set whose metadata lists the training set's categories in another order decodes into the
  training set's label space; renamed, extra or missing categories and a thing that became stuff are errors."""
  reference = Dataset.open(local_dataset)
  order = (2, 0, 3, 1)
  shuffled = fmt.DatasetInfo(tuple(INFO.categories[i] for i in order), tuple(INFO.colors[i] for i in order),
                             tuple(INFO.is_thing[i] for i in order), "panoptic_maps")
  other = open_storage(tmp_path / "reordered")
  other.write_bytes("metadata.yaml", fmt.metadata_yaml(shuffled).encode())
  for name in ("000", "001"):
    for folder, ext in (("images", ".png" if name == "000" else ".jpg"), ("panoptic_maps", ".tif")):
      other.write_bytes(f"{folder}/{name}{ext}", open_storage(local_dataset).read_bytes(f"{folder}/{name}{ext}"))
  reordered = Dataset.open(tmp_path / "reordered")
  assert not np.array_equal(reordered.read_panoptic(0), reference.read_panoptic(0))  # Its own indices differ.
  aligned = reordered.in_label_space(INFO.categories, INFO.is_thing, "the training set")
  for i in range(2):
    np.testing.assert_array_equal(aligned.read_panoptic(i), reference.read_panoptic(i))

  renamed = ("pedestrian",) + INFO.categories[1:]
  with pytest.raises(fmt.FormatError, match=r"categories do not match those of the training set \(missing "
                     r"\['pedestrian'\]; not in the training set: \['person'\]\)"):
    reference.in_label_space(renamed, INFO.is_thing, "the training set")
  with pytest.raises(fmt.FormatError, match=r"thing / stuff differs for \['car'\]"):
    reference.in_label_space(INFO.categories, (True, False, False, False), "the training set")
