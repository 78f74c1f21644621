"""A dataset in the project's format at a location (local folder or S3): listing, pairing and reading examples.

    ds = Dataset.open("s3://bucket/coco/val", endpoint_url="http://127.0.0.1:9000")
    len(ds), ds.examples[0]            # Example(name='000', image='images/000.jpg', annotation='panoptic_maps/000.tif')
    ds.unpaired_images                 # images without an annotation (valid input for prediction)
    ex = ds.read_example(0)            # {"image": uint8 [H, W, 3], "panoptic": int32 [H, W], "name": "000"}

Pairing is by file stem: `<annotations>/<stem>.tif|.tiff` annotates `images/<stem>.<ext>`. Only files directly
inside the two folders count (subfolders are ignored), and only with the known extensions (format.IMAGE_EXTENSIONS,
DatasetInfo.annotation_extensions: .tif / .tiff, and .png too for a semantic dataset; any letter case). Files
without a partner are kept in `unpaired_images` / `unpaired_annotations` and reported with a warning (count and
first names), never silently dropped. Two files of one folder with the same stem (000.jpg and 000.png) are
ambiguous and raise FormatError.

A Dataset holds only names and the metadata; it pickles cheaply (the storage rebuilds its client per process).
"""

import dataclasses
import io
import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.storage import Storage, StorageError, open_storage

IMAGES = "images"
METADATA = "metadata.yaml"
_MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class Example:
  """One dataset item: paths relative to the dataset location; either may be None (not both)."""

  name: str
  image: str | None
  annotation: str | None


def _stem_and_ext(filename: str) -> tuple[str, str]:
  stem, ext = os.path.splitext(filename)
  return stem, ext.lower()


def _index(folder: str, names: list[str], extensions: tuple[str, ...], where: str) -> dict[str, str]:
  """stem -> relative path for files with `extensions`; FormatError when two files share a stem."""
  by_stem: dict[str, list[str]] = {}
  for name in names:
    stem, ext = _stem_and_ext(name)
    if ext in extensions and stem:
      by_stem.setdefault(stem, []).append(name)
  clashes = {stem: files for stem, files in by_stem.items() if len(files) > 1}
  if clashes:
    listed = "; ".join(f"{', '.join(files)}" for files in list(clashes.values())[:_MAX_LISTED])
    raise fmt.FormatError(f"{where}/{folder}: {len(clashes)} file names are ambiguous (one stem, several files): "
                          f"{listed}; keep one file per stem")
  return {stem: f"{folder}/{files[0]}" for stem, files in by_stem.items()}


def _listed(names: list[str]) -> str:
  more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def read_metadata(storage: Storage) -> fmt.DatasetInfo:
  """Reads and parses metadata.yaml; StorageError / FormatError naming the location when absent or malformed."""
  try:
    data = storage.read_bytes(METADATA)
  except StorageError as e:
    if storage.exists(METADATA):  # Raises itself, naming the bucket, when the bucket is missing.
      raise
    raise StorageError(f"{e}; every dataset location holds {METADATA}, {IMAGES}/ and the annotations folder that "
                       f"{METADATA} names", storage.describe(), METADATA) from None
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise fmt.FormatError(f"{storage.url(METADATA)}: expected UTF-8 YAML text, found undecodable bytes ({e})") from None
  return fmt.parse_metadata(text, where=storage.url(METADATA))


class Dataset:
  """The files of one dataset location, paired by stem; reads and decodes examples on demand.

  Attributes:
    storage: where the files are.
    info: the parsed metadata.yaml.
    examples: the items, sorted by name. With images required: every image that has an annotation. Without
      (`require_images=False`, e.g. a folder of predictions): every annotation, with its image when there is one.
    unpaired_images: relative paths of images without an annotation, sorted.
    unpaired_annotations: relative paths of annotations without an image, sorted (always empty without images
      required: those annotations are examples then).
    num_images, num_annotations: files found in each folder (with known extensions).
  """

  def __init__(self, storage: Storage, info: fmt.DatasetInfo, examples: list[Example], unpaired_images: list[str],
               unpaired_annotations: list[str], num_images: int, num_annotations: int):
    self.storage = storage
    self.info = info
    self.examples = examples
    self.unpaired_images = unpaired_images
    self.unpaired_annotations = unpaired_annotations
    self.num_images = num_images
    self.num_annotations = num_annotations

  @classmethod
  def open(cls, location: "str | os.PathLike[str] | Storage", endpoint_url: str | None = None,
           require_images: bool = True) -> "Dataset":
    """Reads metadata.yaml and lists images/ and the annotations folder.

    Args:
      location: folder path, `s3://bucket/prefix`, or an open Storage.
      endpoint_url: S3 endpoint (else AWS_ENDPOINT_URL_S3 or the AWS profile's).
      require_images: False for a folder holding only annotations and metadata (predictions): then every
        annotation is an example, paired with its image when images/ has one.

    Raises:
      StorageError: the location cannot be read or has no metadata.yaml; with images required, no images found.
      FormatError: metadata.yaml is malformed, or two files of one folder share a stem.
    """
    storage = open_storage(location, endpoint_url)
    info = read_metadata(storage)
    where = storage.describe()
    images = _index(IMAGES, storage.list_files(IMAGES), fmt.IMAGE_EXTENSIONS, where)
    annotations = _index(info.annotations, storage.list_files(info.annotations), info.annotation_extensions, where)
    if require_images and not images:
      raise StorageError(f"{where}: no images found directly inside {storage.url(IMAGES)}/ (extensions "
                         f"{', '.join(fmt.IMAGE_EXTENSIONS)})", where, IMAGES)
    if not require_images and not annotations:
      raise StorageError(f"{where}: no annotations found directly inside {storage.url(info.annotations)}/ "
                         f"(extensions {', '.join(info.annotation_extensions)})", where, info.annotations)
    if require_images:
      names = sorted(images.keys() & annotations.keys())
      unpaired_annotations = sorted(annotations[s] for s in annotations.keys() - images.keys())
    else:
      names = sorted(annotations)
      unpaired_annotations = []
    examples = [Example(n, images.get(n), annotations[n]) for n in names]
    unpaired_images = sorted(images[s] for s in images.keys() - annotations.keys())
    if unpaired_images:
      logging.warning("%s: %d of %d images have no annotation in %s/ (kept in unpaired_images): %s", where,
                      len(unpaired_images), len(images), info.annotations, _listed(unpaired_images))
    if unpaired_annotations:
      logging.warning("%s: %d of %d annotations have no image in %s/ (kept in unpaired_annotations): %s", where,
                      len(unpaired_annotations), len(annotations), IMAGES, _listed(unpaired_annotations))
    return cls(storage, info, examples, unpaired_images, unpaired_annotations, len(images), len(annotations))

  def in_label_space(self, categories: Sequence[str], is_thing: Sequence[bool], reference: str) -> "Dataset":
    """This dataset with its maps decoded in another dataset's label space (categories matched by name, e.g. a
    validation set whose metadata lists them in another order); FormatError when the categories differ."""
    info = fmt.in_label_space(self.info, categories, is_thing, self.storage.describe(), reference)
    return Dataset(self.storage, info, self.examples, self.unpaired_images, self.unpaired_annotations,
                   self.num_images, self.num_annotations)

  def __len__(self) -> int:
    return len(self.examples)

  def __repr__(self) -> str:
    return (f"Dataset({self.storage.describe()!r}: {len(self.examples)} examples, {self.num_images} images, "
            f"{self.num_annotations} annotations, {self.info.num_classes} categories)")

  @property
  def names(self) -> list[str]:
    return [e.name for e in self.examples]

  def read_image(self, i: int) -> np.ndarray:
    """uint8 [H, W, 3] RGB of example i."""
    example = self.examples[i]
    if example.image is None:
      raise StorageError(f"{self.storage.describe()}: example {example.name!r} has no image in {IMAGES}/",
                         self.storage.describe(), example.name)
    return fmt.decode_image(self.storage.read_bytes(example.image), where=self.storage.url(example.image))

  def read_panoptic(self, i: int, image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """int32 [H, W] canonical panoptic map of example i, resized to `image_hw` (default: its image's size, read
    from the image header only; the map's own size when the example has no image)."""
    example = self.examples[i]
    if example.annotation is None:
      raise StorageError(f"{self.storage.describe()}: example {example.name!r} has no annotation",
                         self.storage.describe(), example.name)
    if image_hw is None and example.image is not None:
      annotation, image = self.storage.read_many([example.annotation, example.image])
      image_hw = image_size(image, self.storage.url(example.image))
    else:
      annotation = self.storage.read_bytes(example.annotation)
    return fmt.decode_annotation(annotation, self.info, image_hw, where=self.storage.url(example.annotation))

  def read_example(self, i: int) -> dict:
    """{"image": uint8 [H, W, 3], "panoptic": int32 [H, W] (image size), "name": str} for example i.

    For an example without an image (require_images=False), "image" is None and the map keeps its own size.
    """
    example = self.examples[i]
    if example.image is None:
      return {"image": None, "panoptic": self.read_panoptic(i), "name": example.name}
    image_bytes, annotation = self.storage.read_many([example.image, example.annotation])
    image = fmt.decode_image(image_bytes, where=self.storage.url(example.image))
    panoptic = fmt.decode_annotation(annotation, self.info, image.shape[:2],
                                     where=self.storage.url(example.annotation))
    return {"image": image, "panoptic": panoptic, "name": example.name}


def image_size(data: bytes, where: str = "image") -> tuple[int, int]:
  """(H, W) of an encoded image from its header, without decoding the pixels."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
  except Exception as e:  # Pillow raises several types for corrupt input.
    raise fmt.FormatError(f"{where}: cannot decode as an image: {type(e).__name__}: {e}") from None
  return height, width
