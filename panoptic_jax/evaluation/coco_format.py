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
import functools
import io
import json
import logging
import os
import pathlib

import numpy as np
from PIL import Image

from panoptic_jax.data.resampling import opencv
from panoptic_jax.errors import UserError
from panoptic_jax.evaluation.segment_stats import NO_CROWD, UNLISTED, VOID, SegmentHistogram


def _decode_rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB (C order) of a PNG: libspng (pyspng) when installed, about 1.5x faster than OpenCV's
  libpng and 2x Pillow's here; else OpenCV, else Pillow."""
  with open(path, "rb") as f:
    data = f.read()
  if _pyspng() is not None:
    try:
      return _pyspng().load(data, format="RGB")
    except RuntimeError as e:
      raise ValueError(f"not a PNG libspng can decode ({e})") from None
  cv2 = opencv()
  if cv2 is not None:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
      raise ValueError("not a PNG OpenCV can decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


@functools.cache
def _pyspng():
  """The pyspng module, or None when it is not installed."""
  try:
    import pyspng  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return pyspng


def _entries(table: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Where each pixel's id is in `table`: (entry [H, W], the index in `table` (sorted uint32 ids R + 256 G +
  256^2 B) of the pixel's id, or len(table) for an id not listed; counts [len(table) + 1] of each entry).

  Each pixel finds its entry through its id's low 16 bits (its R and G bytes, read in place as one little-endian
  uint16), and the B bytes are checked afterwards with one 2-D histogram of (entry, B), which also gives the counts:
  far cheaper than forming 24-bit ids or comparing per pixel. Only when a pixel's B differs from its entry's (an
  unlisted id sharing a listed one's low 16 bits) are the pixels compared one by one. When two listed ids share
  their low 16 bits, by binary search on the full ids instead. Entries are uint8 when the table is small (the usual
  case), which makes the lookups and histograms cheaper.
  """
  missing = len(table)
  low = table & 0xFFFF
  high = (table >> 16).astype(np.int16)
  if missing >= 255 or len(np.unique(low)) < len(table):
    ids = _ids(rgb)
    entry = np.minimum(np.searchsorted(table, ids), missing - 1).astype(np.intp)
    entry = np.where(np.take(table, entry) == ids, entry, missing)
    return entry, np.bincount(entry.ravel(), minlength=missing + 1)
  lookup = np.full(1 << 16, missing, np.uint8)
  lookup[low] = np.arange(missing)
  h, w, _ = rgb.shape
  entry = np.take(lookup, np.ndarray((h, w), "<u2", rgb, 0, (rgb.strides[0], 3)))  # np.take: 2x faster than [].
  by_b = _histogram_2d(entry, rgb, missing + 1, 256, channel=2)  # [entry, B]
  counts = by_b[np.arange(missing), high]
  if (by_b[:missing].sum(axis=1) != counts).any():  # Unlisted ids with a listed id's low 16 bits.
    entry = np.where(np.take(np.append(high, np.int16(-1)), entry) == rgb[..., 2], entry, np.uint8(missing))
  return entry, np.append(counts, entry.size - counts.sum())


def _histogram_2d(a: np.ndarray, b: np.ndarray, a_bins: int, b_bins: int, channel: int = 0) -> np.ndarray:
  """int64 [a_bins, b_bins] pixel counts of the value pairs of [H, W] `a` and `b` ([H, W], or [H, W, C] and a
  channel), values below the bin counts. OpenCV's histogram of uint8 maps (exact: float32 counts below 2^24 pixels)
  is several times faster than numpy's bincount of combined indices, which serves the other cases."""
  cv2 = opencv()
  if cv2 is not None and a.dtype == b.dtype == np.uint8 and a.size < 1 << 24:
    return cv2.calcHist([a, b], [0, 1 + channel], None, [a_bins, b_bins], [0, a_bins, 0, b_bins]).astype(np.int64)
  combined = a.astype(np.intp) * b_bins + (b[..., channel] if b.ndim == 3 else b)
  return np.bincount(combined.ravel(), minlength=a_bins * b_bins).reshape(a_bins, b_bins)


def _ids(rgb: np.ndarray) -> np.ndarray:
  """uint32 [H, W] segment ids R + 256 G + 256^2 B of an RGB PNG."""
  r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
  return r | (g << 8) | (b << 16)


class CocoFormatError(UserError, ValueError):
  """COCO panoptic input that cannot be evaluated; the message names the file, image, segment or category."""


@dataclasses.dataclass(frozen=True)
class Category:
  id: int
  name: str
  isthing: bool


@dataclasses.dataclass
class LoadedImage:
  """One image read from COCO panoptic format, as a small table per segment id and each pixel's row in it.

  Attributes:
    entry: uint8 (intp for more than 254 listed ids) [H, W]: each pixel's row in `values` / `crowd_values`.
    values: int32 [E] canonical value of each row (VOID for id 0, unlisted ids and crowd).
    crowd_values: int32 [E] for GT: NO_CROWD, a crowd region's category, or UNLISTED per row; None for predictions
      and for a GT image without crowd or unlisted pixels.
    scores: canonical value -> score, for segments whose JSON entry carries a 'score'.
    segments: [(canonical value or None for crowd, category index, iscrowd)] in segments_info order.
    missing_fn: category index -> number of non-crowd GT segments listed in the JSON but absent from the PNG
      (panopticapi counts them as false negatives).
  """

  entry: np.ndarray
  values: np.ndarray
  crowd_values: np.ndarray | None
  scores: dict
  segments: list
  missing_fn: dict

  @property
  def panoptic(self) -> np.ndarray:
    """int32 [H, W] canonical map (crowd pixels VOID; see crowd)."""
    return np.take(self.values, self.entry)

  @property
  def crowd(self) -> np.ndarray | None:
    """int32 [H, W] crowd map (NO_CROWD, category, or UNLISTED), or None (see crowd_values)."""
    return None if self.crowd_values is None else np.take(self.crowd_values, self.entry)


def segment_histogram(gt: LoadedImage, pred: LoadedImage) -> SegmentHistogram:
  """The joint histogram of a GT and a predicted image of the same size, counted on their entry maps."""
  joint = _histogram_2d(gt.entry, pred.entry, len(gt.values), len(pred.values))
  return SegmentHistogram(joint, gt.values, gt.crowd_values, pred.values)


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

  def _read_rgb(self, key: str) -> np.ndarray:
    path = os.path.join(self.folder, self.annotations[key]["file_name"])
    try:
      return _decode_rgb(path)
    except (OSError, ValueError) as e:
      raise CocoFormatError(f"{path}: cannot read the PNG of image {self.image_ids[key]!r}: {e}") from None

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
    rgb = self._read_rgb(key)
    # A table of the listed ids and 0, in which each pixel finds its entry (`_entries`).
    parsed = []
    for seg in ann["segments_info"]:
      try:
        parsed.append((int(seg["id"]), int(seg["category_id"]), seg))
      except (KeyError, TypeError, ValueError):
        raise CocoFormatError(f"{where}: segment {seg!r} needs 'id' and 'category_id'") from None
    # Ids of 2^24 and above cannot occur in a PNG; they stay out of the table (so count as absent).
    table = np.unique(np.array([sid for sid, _, _ in parsed if 0 <= sid < 1 << 24] + [0], np.uint32))
    entry, counts = _entries(table, rgb)
    all_known = not counts[len(table)]
    counts = counts[:len(table)]
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
    if not all_known and not is_gt:  # Ids in the PNG that the JSON does not list.
      unlisted = np.unique(_ids(rgb)[entry == len(table)]).tolist()
      raise CocoFormatError(f"{where}: segment ids {unlisted[:10]} are in the PNG but not in segments_info")
    # The table's last row serves the pixels whose id is not listed: VOID, and for the GT the UNLISTED crowd value.
    values = np.append(value_of, np.int32(VOID))
    crowd_values = np.append(crowd_of, np.int32(UNLISTED))
    if not is_gt or not ((crowd_of != NO_CROWD).any() or not all_known):
      crowd_values = None  # No pixel is crowd or unlisted: no crowd map (the metric skips one).
    return LoadedImage(entry, values, crowd_values, scores, segments, missing_fn)
