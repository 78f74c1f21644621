"""What the prediction command writes: OUT, itself a dataset in the project's format, with scores, COCO and pictures.

    writer = PredictionWriter("runs/r50/predictions", info, coco=True, overlays=True)
    if not writer.done("000"):
      writer.write("000", image, panoptic, scores, source=(images_storage, "images/000.jpg"))
    summary = writer.close()

OUT (a folder or s3://bucket/prefix) holds:

  metadata.yaml               the model's categories, colours, things and label divisor (written when the writer is
                              created; an OUT whose metadata.yaml describes other categories is refused)
  panoptic_maps/<stem>.tif    the predicted map at the image's original resolution (`encode_annotation`), its thing
                              instances numbered 1..K per category so that decoding gives back the written map
  segments/<stem>.json        its segments with their scores: the format's segment lists (dataset_format docstring);
                              `python -m panoptic_jax.evaluate` computes AP from them
  images/<stem>.<ext>         the image: a symbolic link to the original (absolute path) when the original and OUT
                              are both local, else a copy of its bytes; a PNG of the pixels when there is no source
                              file or its extension is not one of the format's image extensions
  coco/panoptic/<stem>.png    with coco: COCO panoptic PNG, id = R + 256 G + 256^2 B = the segment's `id` in
                              segments/<stem>.json, 0 = void
  coco/panoptic.json          with coco, written by close(): images, annotations (segments_info with id,
                              category_id, iscrowd 0, area, bbox, score) and categories (id, name, isthing, color)
  overlays/<stem>.png         with overlays: `visualize.labelled_overlay`, the image with its segments, their
                              outlines and a legend. PNG, not JPEG: JPEG blurs 1-pixel outlines and small legend text.

So `python -m panoptic_jax.data.validate OUT` accepts OUT, and `python -m panoptic_jax.evaluate --gt GT --pred OUT`
(or `--pred_json OUT/coco/panoptic.json`) scores it, AP included.

COCO ids: categories get 1..C in the model's order, or with `coco_categories` (a COCO panoptic JSON) the ids of the
categories of the same name there; image ids are the stems, or with `coco_categories` the ids of its `images` of the
same file stem (panopticapi pairs images by id).

Resuming: `done(name)` says whether every requested output of an image exists (from one listing of each folder when
the writer is created, plus this writer's writes); a write writes segments/<stem>.json last. coco/panoptic.json is
derived at close from the segment lists of every image with a COCO PNG, those of earlier runs read back from OUT, so a
resumed run's JSON lists every image. `write` is thread-safe for distinct names.

This module needs only numpy, Pillow, tifffile, yaml and the storage layer (no JAX, Flax or training code): a serving
process uses it too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import threading

import numpy as np

from panoptic_jax import visualize
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.dataset import IMAGES, METADATA, read_metadata
from panoptic_jax.data.storage import LocalStorage, Storage, open_file, open_storage
from panoptic_jax.errors import UserError

ANNOTATIONS = "panoptic_maps"
COCO_PNGS = "coco/panoptic"
COCO_JSON = "coco/panoptic.json"
OVERLAYS = "overlays"


class OutputError(UserError, ValueError):
  """OUT or the COCO categories file does not fit this model's outputs; the message names the file and field."""


class PredictionWriter:
  """Writes predictions into OUT (see the module docstring for the layout).

  Args:
    location: OUT, a folder or s3://bucket/prefix.
    info: the model's categories, colours, things and label divisor (its `annotations` folder is replaced by
      panoptic_maps).
    coco: also write COCO panoptic PNGs and, at close, their JSON.
    overlays: also write a picture per image.
    coco_categories: a COCO panoptic JSON (local or s3://) whose `categories` give the COCO category ids by name and
      whose `images` give the image ids by file stem; None: ids 1..C in model order, image ids = stems.
    endpoint_url: the S3 endpoint for s3:// locations.

  Raises:
    OutputError: OUT's metadata.yaml describes other categories; coco_categories lacks a model category, lists it as
      thing / stuff the other way, or is malformed.
  """

  def __init__(self, location: str | os.PathLike | Storage, info: fmt.DatasetInfo, *, coco: bool = False,
               overlays: bool = False, coco_categories: str | os.PathLike | None = None,
               endpoint_url: str | None = None):
    self.storage = open_storage(location, endpoint_url)
    self.info = dataclasses.replace(info, annotations=ANNOTATIONS)
    self.coco = coco
    self.overlays = overlays
    self._index = {name: k for k, name in enumerate(self.info.categories)}
    self._coco_category_ids = list(range(1, self.info.num_classes + 1))
    self._coco_image_ids: dict[str, object] = {}
    if coco and coco_categories is not None:
      self._coco_category_ids, self._coco_image_ids = _coco_ids(coco_categories, self.info, endpoint_url)
    self._check_metadata()
    # What OUT holds: folder -> stems; images also keep their file names (the extension is the original's).
    self._images = _stems(self.storage, IMAGES, fmt.IMAGE_EXTENSIONS)
    self._outputs = {ANNOTATIONS: set(_stems(self.storage, ANNOTATIONS, fmt.ANNOTATION_EXTENSIONS)),
                     fmt.SEGMENTS: set(_stems(self.storage, fmt.SEGMENTS, (".json",)))}
    if coco:
      self._outputs[COCO_PNGS] = set(_stems(self.storage, COCO_PNGS, (".png",)))
    if overlays:
      self._outputs[OVERLAYS] = set(_stems(self.storage, OVERLAYS, (".png",)))
    self._segment_files: dict[str, bytes] = {}  # This writer's segments/<stem>.json, for the COCO JSON at close.
    self._lock = threading.Lock()
    self._written = 0
    self._vanished = 0

  def _check_metadata(self) -> None:
    """Writes metadata.yaml, or checks that OUT's describes this model's categories (a resumed run)."""
    if not self.storage.exists(METADATA):
      self.storage.write_bytes(METADATA, fmt.metadata_yaml(self.info).encode())
      return
    existing = read_metadata(self.storage)
    differ = [f.name for f in dataclasses.fields(fmt.DatasetInfo)
              if getattr(existing, f.name) != getattr(self.info, f.name)]
    if not differ:
      return
    detail = ""
    if set(existing.categories) != set(self.info.categories):
      detail = (f"; only in OUT: {sorted(set(existing.categories) - set(self.info.categories))}, only in the model: "
                f"{sorted(set(self.info.categories) - set(existing.categories))}")
    raise OutputError(f"{self.storage.url(METADATA)}: OUT holds outputs for other categories than this model's "
                      f"({', '.join(differ)} differ{detail}): a different model's outputs. Write into another "
                      "location, or remove the old outputs first")

  def done(self, name: str) -> bool:
    """Whether every requested output of the image `name` (a file stem) exists."""
    with self._lock:
      return name in self._images and all(name in stems for stems in self._outputs.values())

  def write(self, name: str, image: np.ndarray, panoptic: np.ndarray, scores: dict[int, float],
            source: tuple[Storage, str] | None = None) -> None:
    """Writes the outputs of one image (replacing earlier ones). Thread-safe for distinct names.

    Args:
      name: the image's stem: the outputs' file names.
      image: uint8 [H, W, 3] RGB at the original resolution.
      panoptic: int32 [H, W] canonical map at the same resolution.
      scores: canonical value of `panoptic` -> score, for every segment of the map (`predict.segment_scores`;
        values whose segment vanished, e.g. when the map was resized, are ignored and counted).
      source: (storage, relative path) of the original image file, linked or copied into images/; None writes the
        pixels as PNG.

    Raises:
      ValueError: shapes or dtypes other than documented, values outside the categories, a segment without a score.
      StorageError: OUT or the source cannot be written or read.
    """
    image, panoptic = np.asarray(image), np.asarray(panoptic)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or panoptic.shape != image.shape[:2]:
      raise ValueError(f"{name}: expected image uint8 [H, W, 3] and panoptic [H, W] of the same size; found image "
                       f"{image.dtype} {list(image.shape)} and panoptic {list(panoptic.shape)}")
    try:
      renumbered, segments = fmt.number_segments(panoptic, self.info, scores)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
    image_file = self._write_image(name, image, source)
    self.storage.write_bytes(f"{ANNOTATIONS}/{name}.tif", fmt.encode_annotation(renumbered, self.info))
    if self.coco:
      self.storage.write_bytes(f"{COCO_PNGS}/{name}.png", self._coco_png(renumbered, segments))
    if self.overlays:
      picture = visualize.labelled_overlay(image, renumbered, self.info)
      self.storage.write_bytes(f"{OVERLAYS}/{name}.png", fmt.encode_image(picture, ".png"))
    segment_file = fmt.encode_segments(segments)
    self.storage.write_bytes(f"{fmt.SEGMENTS}/{name}.json", segment_file)  # Last: see "Resuming".
    with self._lock:
      self._images[name] = image_file
      for stems in self._outputs.values():
        stems.add(name)
      if self.coco:
        self._segment_files[name] = segment_file
      self._written += 1
      self._vanished += len(scores) - len(segments.segments)

  def _write_image(self, name: str, image: np.ndarray, source: tuple[Storage, str] | None) -> str:
    """Links or copies the original image into images/ (see the module docstring); returns the file's name."""
    ext = os.path.splitext(source[1])[1] if source is not None else ""
    if ext.lower() not in fmt.IMAGE_EXTENSIONS:
      self.storage.write_bytes(f"{IMAGES}/{name}.png", fmt.encode_image(image, ".png"))
      return f"{name}.png"
    storage, relpath = source
    target = f"{IMAGES}/{name}{ext}"
    if isinstance(storage, LocalStorage) and isinstance(self.storage, LocalStorage):
      # OUT may be the images' own dataset: a link must never replace the original it would point to.
      if os.path.realpath(self.storage.url(target)) != os.path.realpath(storage.url(relpath)):
        self.storage.symlink(target, storage.url(relpath))
    else:
      self.storage.write_bytes(target, storage.read_bytes(relpath))
    return f"{name}{ext}"

  def _values(self, segments: fmt.SegmentList) -> np.ndarray:
    """int64 [S]: the canonical value of each listed segment of a map numbered by `number_segments`."""
    return np.array([self._index[s.category] * self.info.label_divisor + s.instance for s in segments.segments],
                    np.int64)

  def _coco_png(self, panoptic: np.ndarray, segments: fmt.SegmentList) -> bytes:
    """COCO panoptic PNG of a renumbered map: each pixel its segment's id (values ascend with ids), void 0."""
    ids = np.searchsorted(self._values(segments), panoptic) + 1
    ids[panoptic == fmt.VOID] = 0
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)
    return fmt.encode_image(rgb, ".png")

  def close(self) -> dict:
    """Writes coco/panoptic.json (with coco) and returns a summary.

    Returns:
      {"location": OUT, "written": images written by this writer, "complete": images in OUT with every requested
      output, "vanished_segments": scored segments absent from the written maps} and, with coco, "coco_images"
      (annotations in coco/panoptic.json) and "coco_json" (its location).
    """
    with self._lock:
      complete = sum(1 for name in self._images if all(name in stems for stems in self._outputs.values()))
      summary = {"location": self.storage.describe(), "written": self._written, "complete": complete,
                 "vanished_segments": self._vanished}
      if self.coco:
        summary["coco_images"] = self._write_coco_json()
        summary["coco_json"] = self.storage.url(COCO_JSON)
    return summary

  def _write_coco_json(self) -> int:
    """Writes coco/panoptic.json for every image with a COCO PNG, its segment list and its image; returns their count."""
    names = sorted(self._outputs[COCO_PNGS])
    usable = [n for n in names if n in self._outputs[fmt.SEGMENTS] and n in self._images]
    if len(usable) < len(names):
      left_out = sorted(set(names) - set(usable))
      logging.warning("%s: %d COCO PNGs have no segment list or image (an interrupted write) and are left out of "
                      "%s: %s", self.storage.describe(), len(left_out), COCO_JSON, ", ".join(left_out[:10]))
    earlier = [n for n in usable if n not in self._segment_files]
    files = dict(self._segment_files)
    files.update(zip(earlier, self.storage.read_many([f"{fmt.SEGMENTS}/{n}.json" for n in earlier])))
    images, annotations = [], []
    for name in usable:
      segments = fmt.decode_segments(files[name], self.info, self.storage.url(f"{fmt.SEGMENTS}/{name}.json"))
      image_id = self._coco_image_ids.get(name, name)
      images.append({"id": image_id, "file_name": self._images[name], "height": segments.height,
                     "width": segments.width})
      annotations.append({"image_id": image_id, "file_name": f"{name}.png", "segments_info": [
          {"id": s.id, "category_id": self._coco_category_ids[self._index[s.category]], "iscrowd": 0, "area": s.area,
           "bbox": list(s.bbox), "score": s.score} for s in segments.segments]})
    categories = [{"id": cid, "name": name, "isthing": int(thing), **({"color": list(color)} if color else {})}
                  for cid, name, thing, color in zip(self._coco_category_ids, self.info.categories, self.info.is_thing,
                                                     self.info.colors)]
    doc = {"images": images, "annotations": annotations, "categories": categories}
    self.storage.write_bytes(COCO_JSON, json.dumps(doc).encode())
    return len(annotations)


def _stems(storage: Storage, folder: str, extensions: tuple[str, ...]) -> dict[str, str]:
  """stem -> file name of the files directly inside `folder` with one of `extensions` (any letter case)."""
  files = {}
  for file in storage.list_files(folder):
    stem, ext = os.path.splitext(file)
    if ext.lower() in extensions:
      files[stem] = file
  return files


def _coco_ids(path: str | os.PathLike, info: fmt.DatasetInfo,
              endpoint_url: str | None) -> tuple[list[int], dict[str, object]]:
  """(COCO category id of each model category, image id by file stem) from a COCO panoptic JSON's categories and
  images, categories matched by name."""
  folder, file = open_file(path, endpoint_url)
  data = folder.read_bytes(file)
  try:
    doc = json.loads(data)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise OutputError(f"{path}: not valid JSON: {e}") from None
  categories = doc.get("categories") if isinstance(doc, dict) else None
  if not isinstance(categories, list):
    raise OutputError(f"{path}: categories: expected a list of {{id, name, isthing}}, found {categories!r:.100}")
  by_name = {}
  for i, c in enumerate(categories):
    if (not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("id"), int)
        or isinstance(c.get("id"), bool)):
      raise OutputError(f"{path}: categories[{i}]: expected an object with an integer id and a name, found "
                        f"{c!r:.100}")
    by_name[c["name"]] = c
  missing = [n for n in info.categories if n not in by_name]
  if missing:
    raise OutputError(f"{path}: categories: the model's categories {missing} are not listed (categories are matched "
                      "by name)")
  flipped = [n for n, thing in zip(info.categories, info.is_thing) if bool(by_name[n].get("isthing", thing)) != thing]
  if flipped:
    raise OutputError(f"{path}: categories: isthing differs from the model's for {flipped}")
  image_ids = {}
  for image in doc.get("images") or []:
    if isinstance(image, dict) and isinstance(image.get("file_name"), str) and "id" in image:
      image_ids[pathlib.PurePosixPath(image["file_name"]).stem] = image["id"]
  return [by_name[n]["id"] for n in info.categories], image_ids
