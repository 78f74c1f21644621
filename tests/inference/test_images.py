"""The images of a prediction (panoptic_jax/inference/images.py): a file, a folder, a dataset; local and on S3."""

import io
import logging
import pickle
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.storage import StorageError, open_storage
from panoptic_jax.inference.images import ImageEntry, ImageSource, NoImagesError

INFO = fmt.DatasetInfo(("person", "sky"), ((220, 20, 60), (70, 130, 180)), (True, False))
EXTENSIONS = r"extensions \.jpg, \.jpeg, \.png, \.bmp, \.webp, any letter case"


def _jpeg(hw=(4, 8), orientation=None) -> bytes:
  """A JPEG of height x width `hw`, with its EXIF orientation tag set when given."""
  exif = Image.Exif()
  if orientation is not None:
    exif[0x0112] = orientation
  buffer = io.BytesIO()
  Image.new("RGB", hw[::-1], (200, 100, 50)).save(buffer, "JPEG", exif=exif)
  return buffer.getvalue()


def _png16(hw=(3, 5)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full(hw, 65535, np.uint16)).save(buffer, "PNG")
  return buffer.getvalue()


def _fill(storage, prefix=""):
  """A folder of three images (one EXIF-turned), a file that is not an image, a hidden companion file, a subfolder."""
  files = {"b.jpg": _jpeg(orientation=6), "A.PNG": _png16(), "c.jpeg": _jpeg((5, 5)), "notes.txt": b"hello",
           "._b.jpg": b"macOS resource fork", "sub/d.jpg": _jpeg()}
  for relpath, data in files.items():
    storage.write_bytes(prefix + relpath, data)


def _check_folder(source, caplog_text):
  assert source.kind == "folder" and source.apply_exif and len(source) == 3
  assert source.entries == [ImageEntry("A", "A.PNG", ".png"), ImageEntry("b", "b.jpg", ".jpg"),
                            ImageEntry("c", "c.jpeg", ".jpeg")]
  assert [source.read(i).shape for i in range(3)] == [(3, 5, 3), (8, 4, 3), (5, 5, 3)]  # b.jpg turned by its EXIF.
  assert source.read(0).dtype == np.uint8 and (source.read(0) == 255).all()  # 16-bit white stays white.
  assert source.read_bytes(1) == _jpeg(orientation=6)
  assert "3 images; ignored 2 other files (._b.jpg, notes.txt) and 1 subfolder, not searched (sub)" in caplog_text
  assert pickle.loads(pickle.dumps(source)).read(2).shape == (5, 5, 3)


def test_folder(tmp_path, caplog):
  _fill(open_storage(tmp_path))
  with caplog.at_level(logging.WARNING):
    source = ImageSource.open(str(tmp_path))
  _check_folder(source, caplog.text)
  assert source.url(1) == str(tmp_path / "b.jpg") and source.storage.url() == str(tmp_path)
  assert source.describe() == f"the folder {tmp_path} (3 images)"


def test_single_file(tmp_path, monkeypatch):
  open_storage(tmp_path).write_bytes("Photo.JPG", _jpeg(orientation=6))
  source = ImageSource.open(str(tmp_path / "Photo.JPG"))
  assert source.kind == "file" and source.entries == [ImageEntry("Photo", "Photo.JPG", ".jpg")]
  assert source.storage.url() == str(tmp_path) and source.url(0) == str(tmp_path / "Photo.JPG")
  assert source.read(0).shape == (8, 4, 3) and source.describe() == f"the image file {tmp_path / 'Photo.JPG'}"
  monkeypatch.chdir(tmp_path)
  assert ImageSource.open("Photo.JPG").url(0) == str(tmp_path / "Photo.JPG")


def test_dataset_reads_its_images_in_their_stored_grid(tmp_path):
  storage = open_storage(tmp_path)
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(INFO).encode())
  storage.write_bytes("images/x.jpg", _jpeg(orientation=6))
  storage.write_bytes("panoptic_maps/x.tif", fmt.encode_annotation(np.full((4, 8), 1000, np.int32), INFO))
  source = ImageSource.open(str(tmp_path))
  assert source.kind == "dataset" and not source.apply_exif
  assert source.entries == [ImageEntry("x", "images/x.jpg", ".jpg")]
  assert source.read(0).shape == (4, 8, 3)  # Not turned: the annotation refers to the stored grid.
  assert source.describe() == f"the images/ folder of the dataset {tmp_path} (1 image)"
  (tmp_path / "images" / "x.jpg").unlink()  # A dataset without images: its images/ folder is named.
  with pytest.raises(NoImagesError, match=rf"^the images/ folder of the dataset {tmp_path}: no images found; found "
                     rf"nothing \(an empty or missing folder\); expected an image file \({EXTENSIONS}\)"):
    ImageSource.open(str(tmp_path))


def test_no_images_is_one_error_naming_the_location_and_what_is_there(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  for location in (empty, tmp_path / "missing", tmp_path / "missing.jpg"):
    with pytest.raises(NoImagesError, match=rf"^{location}: no images found; found nothing \(an empty or missing "
                       rf"folder\); expected an image file \({EXTENSIONS}\), a folder .* or a dataset"):
      ImageSource.open(str(location))
  storage = open_storage(tmp_path / "other")
  storage.write_bytes("scan.tif", b"II*\x00")
  storage.write_bytes("class_a/1.jpg", _jpeg())
  with pytest.raises(NoImagesError, match=r"other: no images found; found 1 other file \(scan\.tif\) and 1 "
                     r"subfolder, not searched \(class_a\); expected"):
    ImageSource.open(str(tmp_path / "other"))
  with pytest.raises(StorageError, match=r"scan\.tif: expected a readable folder, found a file .*; the images "
                     rf"location must be an image file \({EXTENSIONS}\)"):
    ImageSource.open(str(tmp_path / "other" / "scan.tif"))


def test_two_images_with_one_stem_are_an_error_naming_both(tmp_path):
  storage = open_storage(tmp_path)
  for name in ("a.jpg", "a.PNG", "b.jpg"):
    storage.write_bytes(name, _jpeg())
  with pytest.raises(fmt.FormatError, match=rf"^{tmp_path}: 1 file stem with several images: a\.PNG, a\.jpg; keep one"):
    ImageSource.open(str(tmp_path))


def test_s3_folder_file_and_dataset(s3_root, s3_server, caplog):
  storage = open_storage(f"s3://{s3_root}")
  _fill(storage, "photos/")
  storage.write_bytes("ds/metadata.yaml", fmt.metadata_yaml(INFO).encode())
  storage.write_bytes("ds/images/x.jpg", _jpeg(orientation=6))
  with caplog.at_level(logging.WARNING):
    folder = ImageSource.open(f"s3://{s3_root}/photos")
  _check_folder(folder, caplog.text)
  assert folder.url(1) == f"s3://{s3_root}/photos/b.jpg"
  assert folder.describe() == f"the folder s3://{s3_root}/photos at {s3_server.endpoint_url} (3 images)"

  file = ImageSource.open(f"s3://{s3_root}/photos/b.jpg", endpoint_url=s3_server.endpoint_url)
  assert file.kind == "file" and file.entries == [ImageEntry("b", "b.jpg", ".jpg")] and file.read(0).shape == (8, 4, 3)
  dataset = ImageSource.open(f"s3://{s3_root}/ds")
  assert dataset.kind == "dataset" and dataset.url(0) == f"s3://{s3_root}/ds/images/x.jpg"
  assert dataset.read(0).shape == (4, 8, 3)
  with pytest.raises(NoImagesError, match=rf"^s3://{s3_root}/nothing at {s3_server.endpoint_url}: no images found"):
    ImageSource.open(f"s3://{s3_root}/nothing")


def test_needs_no_flax():
  """The serving module runs without flax: importing this module must not load the model or training stack."""
  code = ("import sys, panoptic_jax.inference.images; print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('flax', 'optax', 'orbax', 'grain') or m.startswith(('panoptic_jax.model', 'panoptic_jax.training'))))")
  assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
