"""The images a prediction reads: one image file, a folder of images, or the images/ of a dataset; local or on S3.

    source = ImageSource.open("s3://bucket/photos", endpoint_url="http://127.0.0.1:9000")
    len(source), source.entries[0]     # ImageEntry(name='000', relpath='000.jpg', ext='.jpg')
    image = source.read(0)             # uint8 [H, W, 3], any size and aspect
    source.storage, source.url(0)      # where the original is, to link or copy it next to the outputs

A location is resolved in this order:
  1. a file with an image extension (dataset_format.IMAGE_EXTENSIONS, any letter case): that image alone;
  2. a location holding metadata.yaml: a dataset in the project's format, whose images/ folder is read;
  3. otherwise a folder of images.
Only files directly inside the folder with an image extension are images; hidden files (names starting with '.',
such as the '._photo.jpg' companions macOS writes on shared drives) are not. Other files and subfolders are ignored
and reported in one warning. Every image is named by its file stem, which names its outputs, so two images with one
stem (a.jpg and a.png) are an error naming both. A location without any image is one NoImagesError that names the
location, the accepted extensions and what was found there instead.

`read` raises FormatError (a UserError) naming the file when an image cannot be decoded, so that the prediction
command can count, name and skip it.

Plain image files and folders are turned by their EXIF orientation, as image viewers show them; a dataset's images
keep their stored pixel grid, to which its annotations refer (see `dataset_format.decode_image`).

This module needs only numpy, Pillow and the storage layer, not flax: the serving module uses it too.
"""

import dataclasses
import logging
import os

import numpy as np

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.dataset import IMAGES, METADATA
from panoptic_jax.data.storage import Storage, StorageError, open_storage
from panoptic_jax.errors import UserError

_MAX_LISTED = 10
ACCEPTED = (f"an image file (extensions {', '.join(fmt.IMAGE_EXTENSIONS)}, any letter case), a folder with such files "
            f"directly inside, or a dataset in the project's format ({METADATA} and {IMAGES}/)")


class NoImagesError(UserError, FileNotFoundError):
  """A location holds no image; the message names it, the accepted extensions, and the files found instead."""

  def __str__(self) -> str:
    return self.args[0]


@dataclasses.dataclass(frozen=True)
class ImageEntry:
  """One image of a source.

  Attributes:
    name: the file stem, unique within the source; it names the image's outputs.
    relpath: the file's path relative to the source's storage (with '/' separators).
    ext: the file's extension in lower case, with the dot ('.jpg').
  """

  name: str
  relpath: str
  ext: str


def _image_ext(filename: str) -> str | None:
  """The lower-case extension of an image file name, None for other files and hidden files."""
  stem, ext = os.path.splitext(filename)
  ext = ext.lower()
  return ext if ext in fmt.IMAGE_EXTENSIONS and stem and not filename.startswith(".") else None


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'s' if n != 1 else ''}"


def _listed(names: list[str]) -> str:
  more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def _split_file(location: str) -> tuple[str, str] | None:
  """(parent folder, file name) of a location that names an image file by its extension, else None."""
  if location.endswith("/"):
    return None
  if location.startswith("s3://"):
    if "/" not in location.removeprefix("s3://"):
      return None  # A bucket.
    parent, _, name = location.rpartition("/")
  else:
    parent, name = os.path.split(location.removeprefix("file://"))
  return (parent or ".", name) if _image_ext(name) else None


class ImageSource:
  """The images of one location, sorted by name; each is read and decoded on demand.

  Attributes:
    storage: where the image files are; `entries[i].relpath` is relative to it (for a single file: its folder).
    entries: the images, sorted by name.
    kind: "file", "folder" or "dataset" (a dataset in the project's format, whose images/ are read).
    apply_exif: whether `read` turns the images by their EXIF orientation (plain files and folders, not a dataset).
    where: the location for messages (`Storage.describe()`: with the S3 endpoint, never credentials).
  """

  def __init__(self, storage: Storage, entries: list[ImageEntry], kind: str, where: str):
    self.storage = storage
    self.entries = entries
    self.kind = kind
    self.apply_exif = kind != "dataset"
    self.where = where

  @classmethod
  def open(cls, location: str, endpoint_url: str | None = None) -> "ImageSource":
    """Resolves `location` (see the module docstring) and lists its images; no image is read yet.

    Args:
      location: an image file, a folder, or a dataset location: local path, `file://...` or `s3://bucket/prefix`.
      endpoint_url: S3 endpoint (else AWS_ENDPOINT_URL_S3 or the AWS profile's).

    Raises:
      NoImagesError: no image there (an empty or missing folder, or only other files).
      FormatError: two images share a stem.
      StorageError: the location cannot be read.
    """
    root = open_storage(location, endpoint_url)
    where = root.describe()
    file = _split_file(location)
    if file is not None:
      parent, name = file
      storage = open_storage(parent, endpoint_url)
      if storage.exists(name):
        return cls(storage, [ImageEntry(os.path.splitext(name)[0], name, _image_ext(name))], "file", where)
    if root.exists(METADATA):
      return cls(root, _list_images(root, IMAGES, f"the {IMAGES}/ folder of the dataset {where}"), "dataset", where)
    return cls(root, _list_images(root, "", where), "folder", where)

  def __len__(self) -> int:
    return len(self.entries)

  def describe(self) -> str:
    """The location and what was found, e.g. 'the folder /data/photos (12 images)'."""
    if self.kind == "file":
      return f"the image file {self.where}"
    what = f"the {IMAGES}/ folder of the dataset" if self.kind == "dataset" else "the folder"
    return f"{what} {self.where} ({_count(len(self), 'image')})"

  def url(self, i: int) -> str:
    """The full name of image i, e.g. '/data/photos/000.jpg' or 's3://bucket/photos/000.jpg'."""
    return self.storage.url(self.entries[i].relpath)

  def read_bytes(self, i: int) -> bytes:
    """The file of image i as stored; StorageError naming it when it cannot be read."""
    return self.storage.read_bytes(self.entries[i].relpath)

  def read(self, i: int) -> np.ndarray:
    """Image i as uint8 [H, W, 3] RGB (after its EXIF turn when `apply_exif`); FormatError naming the file when it
    cannot be decoded, StorageError when it cannot be read."""
    return fmt.decode_image(self.read_bytes(i), where=self.url(i), apply_exif=self.apply_exif)


def _list_images(storage: Storage, folder: str, where: str) -> list[ImageEntry]:
  """The images directly inside `folder` of `storage`, sorted by name; `where` names the folder in messages.

  Raises:
    NoImagesError, FormatError, StorageError: see `ImageSource.open`.
  """
  try:
    files = storage.list_files(folder)
  except StorageError as e:  # Most often a file that is not an image, given where a folder is listed.
    raise StorageError(f"{e}; the images location must be {ACCEPTED}", e.location, e.relpath) from None
  others = [f for f in files if _image_ext(f) is None]
  subfolders = storage.list_folders(folder)
  ignored = []
  if others:
    ignored.append(f"{_count(len(others), 'other file')} ({_listed(others)})")
  if subfolders:
    ignored.append(f"{_count(len(subfolders), 'subfolder')}, not searched ({_listed(subfolders)})")
  by_stem: dict[str, list[str]] = {}
  for filename in files:
    if _image_ext(filename) is not None:
      by_stem.setdefault(os.path.splitext(filename)[0], []).append(filename)
  if not by_stem:
    found = " and ".join(ignored) if ignored else "nothing (an empty or missing folder)"
    raise NoImagesError(f"{where}: no images found; found {found}; expected {ACCEPTED}")
  if ignored:
    logging.warning("%s: %s; ignored %s", where, _count(len(by_stem), "image"), " and ".join(ignored))
  clashes = [names for names in by_stem.values() if len(names) > 1]
  if clashes:
    listed = "; ".join(", ".join(names) for names in clashes[:_MAX_LISTED])
    raise fmt.FormatError(f"{storage.url(folder)}: {_count(len(clashes), 'file stem')} with several images: {listed}; "
                          "keep one image per stem, since the stem names the image's outputs")
  prefix = f"{folder}/" if folder else ""
  return [ImageEntry(stem, prefix + names[0], _image_ext(names[0])) for stem, names in sorted(by_stem.items())]
