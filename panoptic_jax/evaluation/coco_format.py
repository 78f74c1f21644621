"""COCO panoptic format (JSON + PNG folder) read into canonical maps for evaluation, as panopticapi reads it.

PNG segment id = R + 256 G + 256^2 B. Categories come from a reference list (the GT JSON's `categories`); a
category's index in that list is its canonical category. Every listed segment stays its own segment (stuff is not
merged): things are numbered 1..K per category, stuff 0..K-1, in `segments_info` order.

Panopticapi's edge rules are kept:
  * id 0 is VOID unless `segments_info` lists it (a prediction may use 0 as a real segment);
  * GT crowd segments (`iscrowd: 1`) become the crowd map; only the last-listed crowd segment of a category
    forgives false positives, earlier ones become UNLISTED (neither VOID nor a segment);
  * GT pixels whose id is not listed become UNLISTED;
  * a predicted id in the PNG but not the JSON, or in the JSON but not the PNG, or an unknown category, is an error.
GT areas are counted from the PNG (panopticapi reads them from the JSON); a listed area that differs is logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib

import numpy as np
from PIL import Image

from panoptic_jax.data.resampling import opencv
from panoptic_jax.errors import UserError
from panoptic_jax.evaluation.panoptic_quality import NO_CROWD, UNLISTED, VOID


def _decode_rgba(path: str) -> np.ndarray:
  """uint8 [H, W, 4] RGBA of a PNG: OpenCV's decoder when installed (about 1.5x faster than Pillow's), else Pillow."""
  cv2 = opencv()
  if cv2 is not None:
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
      raise ValueError("not a PNG OpenCV can decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA)
  with Image.open(path) as image:
    return np.asarray(image.convert("RGBA"))


def _entries(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """intp [H, W]: for each pixel the index in `table` (sorted uint32 ids) of its id, or of some other entry when
  the id is not in the table (the caller compares)."""
  low = table & 0xFFFF
  if len(np.unique(low)) == len(table):
    lookup = np.zeros(1 << 16, np.intp)
    lookup[low] = np.arange(len(table))
    return lookup[ids & 0xFFFF]
  return np.minimum(np.searchsorted(table, ids), len(table) - 1)


class CocoFormatError(UserError, ValueError):
  """COCO panoptic input that cannot be evaluated; the message names the file, image, segment or category."""


@dataclasses.dataclass(frozen=True)
class Category:
  id: int
  name: str
  isthing: bool


@dataclasses.dataclass
class LoadedImage:
  """One image read from COCO panoptic format.

  Attributes:
    panoptic: int32 [H, W] canonical map (crowd pixels VOID; see crowd).
    crowd: int32 [H, W] crowd map for GT (-1 none, category, or UNLISTED), None for predictions.
    scores: canonical value -> score, for segments whose JSON entry carries a 'score'.
    segments: [(canonical value or None for crowd, category index, iscrowd)] in segments_info order.
    missing_fn: category index -> number of non-crowd GT segments listed in the JSON but absent from the PNG
      (panopticapi counts them as false negatives).
  """

  panoptic: np.ndarray
  crowd: np.ndarray | None
  scores: dict
  segments: list
  missing_fn: dict


@dataclasses.dataclass
class CocoPanoptic:
  """One side (GT or prediction) in COCO panoptic format.

  Attributes:
    json_path: the JSON file.
    folder: the PNG folder.
    categories: the JSON's categories (may be empty for predictions).
    annotations: image key -> annotation dict (keys: PNG file stem).
    image_ids: image key -> the annotation's image_id.
  """

  json_path: str
  folder: str
  categories: list[Category]
  annotations: dict[str, dict]
  image_ids: dict[str, object]

  @classmethod
  def open(cls, json_path: str | os.PathLike, folder: str | os.PathLike | None = None) -> "CocoPanoptic":
    json_path = str(json_path)
    folder = str(folder) if folder is not None else os.path.splitext(json_path)[0]
    try:
      with open(json_path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise CocoFormatError(f"{json_path}: cannot read COCO panoptic JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
      raise CocoFormatError(f"{json_path}: expected a COCO panoptic JSON with an 'annotations' list")
    if not os.path.isdir(folder):
      raise CocoFormatError(f"{json_path}: PNG folder {folder} does not exist")
    categories = []
    for c in data.get("categories") or []:
      try:
        categories.append(Category(int(c["id"]), str(c["name"]), bool(c.get("isthing", 1))))
      except (KeyError, TypeError, ValueError):
        raise CocoFormatError(f"{json_path}: category {c!r} needs 'id' and 'name'") from None
    annotations, image_ids = {}, {}
    for ann in data["annotations"]:
      if "file_name" not in ann or "segments_info" not in ann:
        raise CocoFormatError(f"{json_path}: annotation {ann.get('image_id')!r} needs file_name and segments_info")
      key = pathlib.PurePath(ann["file_name"]).stem
      if key in annotations:
        raise CocoFormatError(f"{json_path}: two annotations use the PNG name {ann['file_name']}")
      annotations[key] = ann
      image_ids[key] = ann.get("image_id", key)
    return cls(json_path, folder, categories, annotations, image_ids)

  def read_ids(self, key: str) -> np.ndarray:
    """[H, W] uint32 segment ids (R + 256 G + 256^2 B) of one image's PNG."""
    path = os.path.join(self.folder, self.annotations[key]["file_name"])
    try:
      rgba = _decode_rgba(path)
    except (OSError, ValueError) as e:
      raise CocoFormatError(f"{path}: cannot read the PNG of image {self.image_ids[key]!r}: {e}") from None
    # The four bytes R, G, B, A of a pixel read as one little-endian uint32 are R + 256 G + 256^2 B + 256^3 A.
    return rgba.view("<u4")[..., 0] & 0xFFFFFF

  def load(self, key: str, category_index: dict[int, int], label_divisor: int, is_gt: bool):
    """One image as canonical maps.

    Args:
      key: image key (PNG stem).
      category_index: COCO category id -> canonical category index.
      label_divisor: for the canonical encoding.
      is_gt: GT rules (crowd map, unlisted pixels) or prediction rules (errors).

    Returns:
      LoadedImage.
    """
    ann = self.annotations[key]
    where = f"{self.json_path}: image {self.image_ids[key]!r} ({ann['file_name']})"
    ids = self.read_ids(key)
    # A table of the listed ids and 0: each pixel finds its entry through its id's low 16 bits (or, when two listed
    # ids share them, by binary search), far cheaper than sorting the image's pixels to find the ids present.
    parsed = []
    for seg in ann["segments_info"]:
      try:
        parsed.append((int(seg["id"]), int(seg["category_id"]), seg))
      except (KeyError, TypeError, ValueError):
        raise CocoFormatError(f"{where}: segment {seg!r} needs 'id' and 'category_id'") from None
    # Ids of 2^24 and above cannot occur in a PNG; they stay out of the table (so count as absent).
    table = np.unique(np.array([sid for sid, _, _ in parsed if 0 <= sid < 1 << 24] + [0], np.uint32))
    entry = _entries(table, ids)
    known = table[entry] == ids
    all_known = bool(known.all())
    counts = np.bincount((entry if all_known else np.where(known, entry, len(table))).ravel(),
                         minlength=len(table) + 1)[:len(table)]
    position = {int(t): i for i, t in enumerate(table)}
    area_of = {int(t): int(c) for t, c in zip(table, counts) if c}
    value_of = np.full(len(table), VOID, np.int32)  # Unlisted ids: VOID (id 0) or handled below.
    crowd_of = np.full(len(table), NO_CROWD, np.int32)
    next_instance: dict[int, int] = {}
    last_crowd: dict[int, int] = {}
    scores = {}
    listed = set()
    segments = []
    missing_fn: dict[int, int] = {}
    for sid, cid, seg in parsed:
      if sid in listed:
        raise CocoFormatError(f"{where}: segment id {sid} is listed twice")
      listed.add(sid)
      if cid not in category_index:
        raise CocoFormatError(f"{where}: segment {sid} has category_id {cid}, which is not among the GT categories")
      k = category_index[cid]
      if sid not in area_of:
        if is_gt:  # panopticapi counts it as a false negative (crowd: nothing).
          if seg.get("iscrowd", 0) != 1:
            missing_fn[k] = missing_fn.get(k, 0) + 1
          continue
        raise CocoFormatError(f"{where}: predicted segment {sid} is in the JSON but not in the PNG")
      if is_gt and "area" in seg and int(seg["area"]) != area_of[sid]:
        logging.warning("%s: GT segment %d lists area %s but has %d pixels; the pixel count is used", where, sid,
                        seg["area"], area_of[sid])
      if is_gt and seg.get("iscrowd", 0) == 1:
        if k in last_crowd:
          crowd_of[position[last_crowd[k]]] = UNLISTED
        last_crowd[k] = sid
        crowd_of[position[sid]] = k
        segments.append((None, k, True))
        continue
      instance = next_instance.get(k, 0)
      next_instance[k] = instance + 1
      if instance >= label_divisor:
        raise CocoFormatError(f"{where}: more than {label_divisor} segments of category {cid}; raise label_divisor")
      value = k * label_divisor + instance
      value_of[position[sid]] = value
      segments.append((value, k, False))
      if "score" in seg:
        scores[value] = float(seg["score"])
    if not all_known:  # Ids in the PNG that the JSON does not list.
      unlisted = np.unique(ids[~known]).tolist()
      if not is_gt:
        raise CocoFormatError(f"{where}: segment ids {unlisted[:10]} are in the PNG but not in segments_info")
    panoptic = value_of[entry]
    crowd = None
    if is_gt:
      crowd = crowd_of[entry]
      if not all_known:
        crowd[~known] = UNLISTED
        panoptic[~known] = VOID
    elif not all_known:
      panoptic[~known] = VOID
    return LoadedImage(panoptic, crowd, scores, segments, missing_fn)
