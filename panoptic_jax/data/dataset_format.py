"""The dataset format: metadata.yaml and 2-page TIFF annotations, decoded once into canonical panoptic maps.

On disk (see the README, "The dataset format"):
  images/<stem>.<ext>         one image per file
  <annotations>/<stem>.tif    page 1: RGB category-colour map; page 2: instance-id map (uint8 / uint16 / uint32)
  metadata.yaml               task, annotations, categories, colors, optional things
  segments/<stem>.json        optional: the segments of an annotation with their scores (predictions; see below)

The semantic variant (`task: semantic segmentation`; external validation sets with semantic labels only) has the same
layout and metadata without `things`; its annotation is one label image per image, `<annotations>/<stem>.png` (or a
single-page `.tif` / `.tiff`): an RGB colour map in the palette of metadata.yaml, black = void (an alpha channel is
dropped). It may be smaller than its image by one factor, as the panoptic maps may. It decodes into the same
canonical map, every pixel `category * label_divisor` (instance 0: every category is treated as stuff).

Inside the code there is one label representation, the int32 canonical panoptic map
`category * label_divisor + instance` with categories 0..C-1 in metadata order and `VOID = -1`. Stuff segments have
instance 0 (all segments of one stuff class in an image merge into one); thing instances are renumbered 1..K per
category in increasing order of their on-disk id. This module is the only place that converts between the two.

Segment lists (`segments/<stem>.json`, optional; predictions write them so that AP can be computed) list every
segment of the annotation `<annotations>/<stem>.tif`, one JSON object per line, in increasing canonical value:

  {"height": 480, "width": 640, "segments": [
  {"id": 1, "category": "road", "instance": 0, "isthing": false, "area": 1000, "bbox": [0, 300, 64, 18], "score": 0.98},
  {"id": 2, "category": "car", "instance": 1, "isthing": true, "area": 5210, "bbox": [40, 310, 120, 60], "score": 0.91}
  ]}

  height, width  the annotation's size at the image's resolution.
  id             the segment's number in the image, 1..S (its id in a COCO panoptic PNG written beside it).
  category       the category's name in metadata.yaml.
  instance       the segment's id on page 2 of the TIFF; 0 for stuff (all pixels of a stuff category are one
                 segment, whatever their ids).
  isthing        as metadata.yaml says for the category.
  area           pixels; bbox [x, y, w, h] in pixels, as COCO.
  score          the segment's confidence (AP ranks thing segments by it).
A thing entry names the decoded map's segment `category * label_divisor + rank`, where rank (from 1) is the place
of its instance among the instances listed for its category, as decoding numbers them: the file lists exactly the
segments of the map.
"""

import dataclasses
import functools
import io
import json
import logging
import math
from collections.abc import Sequence

import numpy as np
import tifffile
import yaml
from PIL import Image, ImageOps

from panoptic_jax.errors import UserError


VOID = -1
TASK = "panoptic segmentation"
SEMANTIC_TASK = "semantic segmentation"
TASKS = (TASK, SEMANTIC_TASK)
DEFAULT_LABEL_DIVISOR = 1000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ANNOTATION_EXTENSIONS = (".tif", ".tiff")
SEMANTIC_ANNOTATION_EXTENSIONS = (".png", ".tif", ".tiff")
SEGMENTS = "segments"  # The folder of the optional segment lists, segments/<stem>.json.

Color = tuple[int, int, int]
_UNKNOWN_COLOR = -1
_MAX_SEGMENT_KEYS = 1 << 22


class FormatError(UserError, ValueError):
  """A dataset file does not follow the format; the message names the file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What metadata.yaml says about a dataset.

  Attributes:
    categories: category names; a category's index in this tuple is its id in canonical maps.
    colors: the RGB colour of each category, or None for a category that has no colour (it cannot be annotated).
    is_thing: per category, True if its segments are countable instances.
    annotations: the folder holding the annotation files, relative to the dataset root, without slashes.
    label_divisor: canonical maps store `category * label_divisor + instance`.
    task: TASK (2-page TIFF panoptic maps) or SEMANTIC_TASK (label images; no thing is then an instance).
  """

  categories: tuple[str, ...]
  colors: tuple[Color | None, ...]
  is_thing: tuple[bool, ...]
  annotations: str = "panoptic_maps"
  label_divisor: int = DEFAULT_LABEL_DIVISOR
  task: str = TASK

  @property
  def num_classes(self) -> int:
    return len(self.categories)

  @property
  def is_semantic(self) -> bool:
    return self.task == SEMANTIC_TASK

  @property
  def annotation_extensions(self) -> tuple[str, ...]:
    """The annotation files' extensions (lower case); `encode_annotation` writes the first."""
    return SEMANTIC_ANNOTATION_EXTENSIONS if self.is_semantic else ANNOTATION_EXTENSIONS

  @property
  def thing_ids(self) -> np.ndarray:
    return np.flatnonzero(np.asarray(self.is_thing, bool))

  @property
  def stuff_ids(self) -> np.ndarray:
    return np.flatnonzero(~np.asarray(self.is_thing, bool))


def in_label_space(info: DatasetInfo, categories: Sequence[str], is_thing: Sequence[bool], where: str,
                   reference: str) -> DatasetInfo:
  """`info` with its categories in the order of `categories` (matched by name), so that maps decoded with it use
  that label space; colours travel with their names.

  Raises:
    FormatError: the names differ (missing, extra or renamed categories) or a category is a thing on one side and
      stuff on the other; the message lists each difference.
  """
  mine, theirs = list(info.categories), list(categories)
  problems = []
  missing, extra = [c for c in theirs if c not in mine], [c for c in mine if c not in theirs]
  if missing:
    problems.append(f"missing {missing}")
  if extra:
    problems.append(f"not in {reference}: {extra}")
  if not problems:
    role = dict(zip(mine, info.is_thing))
    flipped = [c for c, thing in zip(theirs, is_thing) if role[c] != bool(thing)]
    if flipped:
      problems.append(f"thing / stuff differs for {flipped}")
  if problems:
    raise FormatError(f"{where}: its categories do not match those of {reference} ({'; '.join(problems)}); "
                      f"categories are matched by name: {theirs}")
  color = dict(zip(mine, info.colors))
  return dataclasses.replace(info, categories=tuple(theirs), colors=tuple(color[c] for c in theirs),
                             is_thing=tuple(bool(t) for t in is_thing))


# ----------------------------------------------------------------------------------------------------------------------
# metadata.yaml


def _parse_color(value, name: str, where: str) -> Color:
  if (not isinstance(value, (list, tuple)) or len(value) != 3
      or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)):
    raise FormatError(f"{where}: colors.{name}: expected an RGB triplet of integers 0-255, found {value!r}")
  color = (int(value[0]), int(value[1]), int(value[2]))
  if color == (0, 0, 0):
    raise FormatError(f"{where}: colors.{name}: black [0, 0, 0] is reserved for void pixels")
  return color


def parse_metadata(text: str, where: str = "metadata.yaml") -> DatasetInfo:
  """Parses metadata.yaml (safely: plain YAML types only) into a DatasetInfo.

  Raises:
    FormatError: naming the field and what was wrong.
  """
  try:
    meta = yaml.safe_load(text)
  except yaml.YAMLError as e:
    raise FormatError(f"{where}: not valid YAML: {e}") from None
  if not isinstance(meta, dict):
    raise FormatError(f"{where}: expected a mapping with task, annotations, categories, colors; "
                      f"found {type(meta).__name__}")
  task = meta.get("task")
  if task not in TASKS:
    raise FormatError(f"{where}: task: expected {' or '.join(map(repr, TASKS))}, found {task!r}")

  annotations = meta.get("annotations")
  if not isinstance(annotations, str) or not annotations.strip("/"):
    raise FormatError(f"{where}: annotations: expected a folder name such as 'panoptic_maps/', found {annotations!r}")
  annotations = annotations.strip("/")

  categories = meta.get("categories")
  if (not isinstance(categories, list) or not categories
      or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in categories)):
    raise FormatError(f"{where}: categories: expected a non-empty list of names, found {categories!r}")
  categories = tuple(str(c) for c in categories)
  duplicates = sorted({c for c in categories if categories.count(c) > 1})
  if duplicates:
    raise FormatError(f"{where}: categories: names must be unique, found duplicates {duplicates}")

  raw_colors = meta.get("colors") or {}
  if not isinstance(raw_colors, dict):
    raise FormatError(f"{where}: colors: expected a mapping category -> [r, g, b], found {raw_colors!r}")
  unknown = sorted(str(k) for k in raw_colors if str(k) not in categories)
  if unknown:
    raise FormatError(f"{where}: colors: {unknown} are not in categories {list(categories)}")
  colors_by_name = {str(k): _parse_color(v, str(k), where) for k, v in raw_colors.items()}
  owners: dict[Color, str] = {}
  for name, color in colors_by_name.items():
    if color in owners:
      raise FormatError(f"{where}: colors: {owners[color]} and {name} share the colour {list(color)}; "
                        "colours must be unique")
    owners[color] = name
  colors = tuple(colors_by_name.get(c) for c in categories)
  uncoloured = [c for c, col in zip(categories, colors) if col is None]
  if uncoloured:
    logging.warning("%s: categories %s have no colour and cannot appear in annotations", where, uncoloured)

  things = meta.get("things")
  if task == SEMANTIC_TASK:
    if things is not None:
      raise FormatError(f"{where}: things: a {SEMANTIC_TASK} dataset has no instances; remove the field (or make it "
                        f"a {TASK} dataset)")
    is_thing = (False,) * len(categories)
  elif things is None:
    is_thing = (True,) * len(categories)
  else:
    if not isinstance(things, list):
      raise FormatError(f"{where}: things: expected a list of category names, found {things!r}")
    unknown = sorted(str(t) for t in things if str(t) not in categories)
    if unknown:
      raise FormatError(f"{where}: things: {unknown} are not in categories {list(categories)}")
    thing_set = {str(t) for t in things}
    is_thing = tuple(c in thing_set for c in categories)

  label_divisor = meta.get("label_divisor", DEFAULT_LABEL_DIVISOR)
  if not isinstance(label_divisor, int) or isinstance(label_divisor, bool) or label_divisor < 2:
    raise FormatError(f"{where}: label_divisor: expected an integer >= 2, found {label_divisor!r}")
  if len(categories) * label_divisor >= 2**31:
    raise FormatError(f"{where}: label_divisor: {len(categories)} categories x {label_divisor} overflows int32")
  return DatasetInfo(categories, colors, is_thing, annotations, label_divisor, task)


def metadata_yaml(info: DatasetInfo) -> str:
  """Writes a DatasetInfo as metadata.yaml text that `parse_metadata` reads back identically."""
  lines = [f"task: {info.task}", f"annotations: {info.annotations}/", f"categories: {_yaml_list(info.categories)}"]
  if not info.is_semantic:
    lines.append(f"things: {_yaml_list([c for c, t in zip(info.categories, info.is_thing) if t])}")
  if info.label_divisor != DEFAULT_LABEL_DIVISOR:
    lines.append(f"label_divisor: {info.label_divisor}")
  lines.append("colors:")
  lines += [f"  {_yaml_scalar(c)}: [{r}, {g}, {b}]" for c, col in zip(info.categories, info.colors)
            if col is not None for r, g, b in [col]]
  return "\n".join(lines) + "\n"


def _yaml_scalar(value: str) -> str:
  return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...").strip()


def _yaml_list(values: Sequence[str]) -> str:
  return "[" + ", ".join(_yaml_scalar(v) for v in values) + "]"


# ----------------------------------------------------------------------------------------------------------------------
# Annotations


def _pack_rgb(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Colour planes (uint8, same shape) -> int32 codes 0xRRGGBB."""
  return (r.astype(np.int32) << 16) | (g.astype(np.int32) << 8) | b.astype(np.int32)


def _planar(tiff: tifffile.TiffFile) -> bool | None:
  """Whether the first page stores its samples as separate planes (PLANARCONFIG 2); None without pages."""
  return int(tiff.pages[0].planarconfig) == 2 if len(tiff.pages) else None


def _rgb_planes(page: np.ndarray, where: str,
                separate: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The R, G, B planes of page 1, channels-first [3, H, W] (tifffile's planar layout) or channels-last [H, W, 3].

  `separate`: the page's planar configuration from the TIFF header, which settles shapes such as [4, 6, 3] that fit
  both layouts; None guesses from the shape.
  """
  if separate is not None and page.ndim == 3 and page.shape[0 if separate else -1] in (3, 4):
    return (page[0], page[1], page[2]) if separate else (page[..., 0], page[..., 1], page[..., 2])
  if page.ndim == 3 and page.shape[-1] in (3, 4) and page.shape[0] not in (3, 4):
    return page[..., 0], page[..., 1], page[..., 2]
  if page.ndim == 3 and page.shape[0] in (3, 4):
    return page[0], page[1], page[2]
  raise FormatError(f"{where}: page 1 must be an RGB image [3, H, W] or [H, W, 3]; found shape {page.shape}")


def resize_nearest(label: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of a [h, w] map to `out_hw`, sampling each output pixel's centre."""
  h, w = label.shape
  rows = np.minimum(((np.arange(out_hw[0]) + 0.5) * h / out_hw[0]).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(out_hw[1]) + 0.5) * w / out_hw[1]).astype(np.int64), w - 1)
  return label[rows[:, None], cols[None, :]]


def check_scale(map_hw: tuple[int, int], image_hw: tuple[int, int], where: str) -> None:
  """A map may be smaller than its image by one factor in both directions (within one map pixel of rounding).

  Raises:
    FormatError: naming `where`, when the map is larger than the image or its aspect ratio differs.
  """
  (h, w), (big_h, big_w) = map_hw, image_hw
  if h > big_h or w > big_w:
    raise FormatError(f"{where}: annotation is {h}x{w} but its image is only {big_h}x{big_w}; "
                      "annotations may be smaller than the image, never larger")
  scale_h, scale_w = big_h / h, big_w / w
  # Rounding a downscaled side may move it by up to one map pixel, i.e. one `scale` in image pixels.
  if abs(h * scale_w - big_h) > scale_w and abs(w * scale_h - big_w) > scale_h:
    raise FormatError(f"{where}: annotation is {h}x{w} (aspect {w / h:.4f}) but its image is {big_h}x{big_w} "
                      f"(aspect {big_w / big_h:.4f}); the annotation must be the image scaled by one factor")


def fit_to_image(label: np.ndarray, image_hw: tuple[int, int] | None, where: str) -> np.ndarray:
  """A decoded [h, w] map resized (nearest) to its image's (H, W) after `check_scale`; as it is for None."""
  if image_hw is None or tuple(image_hw) == label.shape:
    return label
  check_scale(label.shape, tuple(image_hw), where)
  return resize_nearest(label, tuple(image_hw))


def decode_annotation(data: bytes, info: DatasetInfo, image_hw: tuple[int, int] | None = None,
                      where: str = "annotation") -> np.ndarray:
  """Decodes an annotation file into the canonical panoptic map: a 2-page TIFF, or for a semantic dataset a label
  image (`decode_label_image`).

  Args:
    data: the file's bytes.
    info: the dataset's metadata (task, palette, things, label divisor).
    image_hw: (H, W) of the image it annotates; a smaller map is resized (nearest) to it. None keeps the map's size.
    where: the file's name for error messages.

  Returns:
    int32 [H, W] canonical panoptic map.

  Raises:
    FormatError: naming the file, for undecodable data, a page count other than 2, page shapes that differ, a wrong
      aspect ratio, colours not in the palette, or more instances of one category than label_divisor - 1.
  """
  if info.is_semantic:
    return fit_to_image(decode_label_image(data, info, where), image_hw, where)
  try:
    with tifffile.TiffFile(io.BytesIO(data)) as tiff:
      pages = [page.asarray() for page in tiff.pages]
      separate = _planar(tiff)
  except Exception as e:  # tifffile raises many types for corrupt input; all mean the same thing to the user.
    raise FormatError(f"{where}: cannot decode as TIFF: {type(e).__name__}: {e}") from None
  if len(pages) != 2:
    raise FormatError(f"{where}: expected 2 pages (RGB category map, instance-id map), found {len(pages)}")
  planes = _rgb_planes(pages[0], where, separate)
  ids = pages[1]
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise FormatError(f"{where}: page 2 must be a 2-D integer instance-id map; found shape {ids.shape} {ids.dtype}")
  if planes[0].shape != ids.shape:
    raise FormatError(f"{where}: page shapes differ: category map {planes[0].shape}, instance map {ids.shape}")

  return fit_to_image(_panoptic_from_pages(_pack_rgb(*planes), ids, info, where), image_hw, where)


def _is_tiff(data: bytes) -> bool:
  return data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # Classic and BigTIFF, both byte orders.


def decode_label_image(data: bytes, info: DatasetInfo, where: str = "label image") -> np.ndarray:
  """Decodes a semantic dataset's label image (an RGB colour map in the metadata's palette) at its own size.

  Args:
    data: the file's bytes: PNG (or another format Pillow reads; modes RGB, RGBA with the alpha dropped, P) or a
      single-page TIFF (either planar layout).
    info: the dataset's metadata (palette, label divisor).
    where: the file's name for error messages.

  Returns:
    int32 [h, w] canonical map: `category * label_divisor` where the colour is a category's, VOID where black.

  Raises:
    FormatError: naming the file: undecodable, not an RGB colour map (a single-channel class-id image, several TIFF
      pages), or colours not in the palette (listed with their pixel counts).
  """
  if _is_tiff(data):
    try:
      with tifffile.TiffFile(io.BytesIO(data)) as tiff:
        pages = [page.asarray() for page in tiff.pages]
        separate = _planar(tiff)
    except Exception as e:  # tifffile raises many types for corrupt input.
      raise FormatError(f"{where}: cannot decode as TIFF: {type(e).__name__}: {e}") from None
    if len(pages) != 1:
      raise FormatError(f"{where}: expected a single-page RGB colour map, found {len(pages)} pages")
    planes = _rgb_planes(pages[0], where, separate)
  else:
    try:
      with Image.open(io.BytesIO(data)) as image:
        mode = image.mode
        if mode in ("RGB", "RGBA", "P", "PA"):
          rgb = np.asarray(image.convert("RGBA"))  # Via RGBA: a palette with transparency converts without warning.
    except Exception as e:  # Pillow raises several types for corrupt input.
      raise FormatError(f"{where}: cannot decode as an image: {type(e).__name__}: {e}") from None
    if mode not in ("RGB", "RGBA", "P", "PA"):
      raise FormatError(f"{where}: expected an RGB colour map (PNG mode RGB, RGBA or P), found mode {mode}; a "
                        "single-channel image of class ids is not a colour map: colour it with metadata.yaml's "
                        "palette")
    planes = (rgb[..., 0], rgb[..., 1], rgb[..., 2])
  codes = _pack_rgb(*planes)
  entries = _palette_lookup(info.colors, info.is_thing)[codes]
  if (entries == _UNKNOWN_COLOR).any():
    raise _unknown_color_error(codes, entries, where)
  return np.where(entries == 0, VOID, ((entries.astype(np.int32) >> 1) - 1) * info.label_divisor).astype(np.int32)


@functools.lru_cache(maxsize=8)
def _palette_lookup(colors: tuple[Color | None, ...], is_thing: tuple[bool, ...]) -> np.ndarray:
  """int16 [2**24]: packed colour -> 2 * (category + 1) + is_thing; 0 for black (void); -1 for unknown colours.

  A direct table turns colour decoding into one gather per pixel that yields both the category and whether it is a
  thing; 32 MB, built once per palette and process.
  """
  table = np.full(1 << 24, _UNKNOWN_COLOR, np.int16)
  table[0] = 0
  for category, (color, thing) in enumerate(zip(colors, is_thing)):
    if color is not None:
      table[_pack_rgb(*np.array(color, np.uint8))] = 2 * (category + 1) + thing
  return table


def _unknown_color_error(codes: np.ndarray, entries: np.ndarray, where: str) -> FormatError:
  bad_codes, counts = np.unique(codes[entries == _UNKNOWN_COLOR], return_counts=True)
  listed = ", ".join(f"[{c >> 16}, {(c >> 8) & 255}, {c & 255}] ({n} px)" for c, n in zip(bad_codes[:10], counts[:10]))
  more = f" and {len(bad_codes) - 10} more" if len(bad_codes) > 10 else ""
  return FormatError(f"{where}: {len(bad_codes)} colours are not in the metadata palette: {listed}{more}")


def _panoptic_from_pages(codes: np.ndarray, ids: np.ndarray, info: DatasetInfo, where: str) -> np.ndarray:
  """[H, W] packed colours and instance ids -> [H, W] int32 canonical map."""
  entries = _palette_lookup(info.colors, info.is_thing)[codes]
  if (entries == _UNKNOWN_COLOR).any():
    raise _unknown_color_error(codes, entries, where)
  num_ids = int(ids.max(initial=0)) + 1
  if num_ids * (info.num_classes + 1) > _MAX_SEGMENT_KEYS:  # Sparse ids such as 0, 70000, 2**31: compress first.
    _, ids = np.unique(ids, return_inverse=True)
    num_ids = int(ids.max(initial=0)) + 1
  entries = entries.astype(np.int32)
  # Segment key = (category + 1, id); stuff ignores the id so that all its segments merge into one.
  keys = (entries >> 1) * num_ids + (entries & 1) * ids.astype(np.int32)
  present = np.flatnonzero(np.bincount(keys.ravel(), minlength=(info.num_classes + 1) * num_ids))
  seg_category = present // num_ids - 1
  # Keys are sorted by (category, id): a thing's instance number is its rank within its category, from 1.
  rank = np.arange(len(present)) - np.searchsorted(seg_category, seg_category, side="left") + 1
  seg_is_thing = np.asarray(info.is_thing + (False,), bool)[seg_category]  # Index -1 (void) reads the False.
  if seg_is_thing.any() and rank[seg_is_thing].max() >= info.label_divisor:
    worst = seg_category[seg_is_thing][np.argmax(rank[seg_is_thing])]
    raise FormatError(f"{where}: {rank[seg_is_thing].max()} instances of {info.categories[worst]!r}; at most "
                      f"{info.label_divisor - 1} fit label_divisor {info.label_divisor}")
  values = np.where(seg_category == VOID, VOID, seg_category * info.label_divisor + np.where(seg_is_thing, rank, 0))
  lookup = np.zeros(present[-1] + 1, np.int32)
  lookup[present] = values
  return lookup[keys]


def encode_annotation(panoptic: np.ndarray, info: DatasetInfo, downscale: int = 1, id_step: int = 1) -> bytes:
  """Encodes a canonical panoptic map as a 2-page TIFF (zlib), the inverse of `decode_annotation`; for a semantic
  dataset as an RGB PNG label image of its categories (instances dropped; the file's extension is then .png).

  Args:
    panoptic: int32 [H, W] canonical map.
    info: the dataset's metadata.
    downscale: store the maps `downscale` times smaller (nearest), as the format allows.
    id_step: thing instance k is stored as id `k * id_step` (ids need not be consecutive; > 1 spreads them out).

  Returns:
    The file's bytes: page 1 RGB channels-first, page 2 the instance numbers as the smallest unsigned type that holds
    them; a PNG for a semantic dataset.
  """
  panoptic = np.asarray(panoptic)
  if downscale > 1:
    out_hw = (-(-panoptic.shape[0] // downscale), -(-panoptic.shape[1] // downscale))
    panoptic = resize_nearest(panoptic, out_hw)
  if panoptic.min(initial=0) < VOID or panoptic.max(initial=0) >= info.num_classes * info.label_divisor:
    raise ValueError(f"panoptic map holds values outside 0..{info.num_classes * info.label_divisor - 1} and VOID")
  category = panoptic // info.label_divisor  # VOID (-1) -> -1, which indexes the black row appended below.
  if any(c is None for c in info.colors):
    present = np.flatnonzero(np.bincount(category[category >= 0], minlength=info.num_classes))
    missing = [info.categories[c] for c in present if info.colors[c] is None]
    if missing:
      raise ValueError(f"categories {missing} have no colour in the metadata and cannot be written")
  palette = np.array([c if c is not None else (0, 0, 0) for c in info.colors] + [(0, 0, 0)], np.uint8)
  if info.is_semantic:
    return encode_image(palette[category], ".png")
  rgb = palette.T[:, category]  # [3, H, W]: tifffile's planar RGB layout, built without a transpose copy.
  instance = np.where(category >= 0, panoptic - category * info.label_divisor, 0).astype(np.int64) * id_step
  top = instance.max(initial=0)
  id_dtype = np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32
  buffer = io.BytesIO()
  # zlib level 1: 3x faster to write and to read than the default level, for files ~1.5x larger.
  options = {"compression": "zlib", "compressionargs": {"level": 1}}
  with tifffile.TiffWriter(buffer) as tiff:
    tiff.write(rgb, photometric="rgb", **options)
    tiff.write(instance.astype(id_dtype), photometric="minisblack", **options)
  return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------------
# Segment lists (segments/<stem>.json)


@dataclasses.dataclass(frozen=True)
class Segment:
  """One entry of a segment list (see the module docstring for the fields)."""

  id: int
  category: str
  instance: int
  isthing: bool
  area: int
  bbox: tuple[int, int, int, int]
  score: float


@dataclasses.dataclass(frozen=True)
class SegmentList:
  """A decoded segments/<stem>.json: the annotation's size at image resolution and its segments."""

  height: int
  width: int
  segments: tuple[Segment, ...]

  def scores(self, info: DatasetInfo) -> dict[int, float]:
    """Canonical value -> score, each (category, instance) numbered as `decode_annotation` numbers it: stuff gets
    instance 0, a thing the rank of its instance among the listed instances of its category, from 1."""
    index = {name: k for k, name in enumerate(info.categories)}
    ids: dict[str, list[int]] = {}
    for s in self.segments:
      ids.setdefault(s.category, []).append(s.instance)
    rank = {(c, i): r for c, listed in ids.items() for r, i in enumerate(sorted(listed), 1)}
    return {index[s.category] * info.label_divisor + (rank[s.category, s.instance] if s.isthing else 0): s.score
            for s in self.segments}


def number_segments(panoptic: np.ndarray, info: DatasetInfo,
                    scores: dict[int, float]) -> tuple[np.ndarray, SegmentList]:
  """Numbers a canonical map's thing instances as decoding will and lists its segments.

  Decoding numbers a category's thing instances 1..K by the rank of their on-disk ids, so a map whose instances are
  not 1..K (a segment vanished when the map was resized) would decode to other values than it holds. Renumbered by
  rank first, the map decodes to itself after `encode_annotation`.

  Args:
    panoptic: int32 [H, W] canonical map.
    info: its metadata.
    scores: canonical value of `panoptic` -> score; every segment of the map needs one (others are ignored).

  Returns:
    The renumbered int32 [H, W] map and its SegmentList (segments in increasing value, ids 1..S).

  Raises:
    ValueError: a value outside the categories, a stuff value with an instance other than 0, or a segment without
      a score.
  """
  panoptic = np.asarray(panoptic)
  values, inverse, area = np.unique(panoptic, return_inverse=True, return_counts=True)
  inverse = inverse.reshape(panoptic.shape)
  category = values // info.label_divisor  # VOID -> -1, sorted first.
  if values[0] < VOID or category[-1] >= info.num_classes:
    raise ValueError(f"the map holds values outside VOID and 0..{info.num_classes * info.label_divisor - 1}")
  is_thing = np.asarray(info.is_thing + (False,), bool)[category]  # Index -1 (VOID) reads the False.
  stuff_instances = (values >= 0) & ~is_thing & (values % info.label_divisor != 0)
  if stuff_instances.any():
    raise ValueError(f"stuff values {values[stuff_instances][:10].tolist()} have an instance other than 0; "
                     "canonical maps give stuff instance 0")
  missing = [int(v) for v in values if v >= 0 and int(v) not in scores]
  if missing:
    raise ValueError(f"segments {missing[:10]} of the map have no score")
  rank = np.arange(len(values)) - np.searchsorted(category, category, side="left") + 1
  renumbered = np.where(values < 0, VOID, category * info.label_divisor + np.where(is_thing, rank, 0))
  # Bounding boxes from the rows and columns each segment occupies.
  h, w = panoptic.shape
  rows = np.bincount((inverse * h + np.arange(h)[:, None]).ravel(), minlength=len(values) * h).reshape(-1, h) > 0
  cols = np.bincount((inverse * w + np.arange(w)[None, :]).ravel(), minlength=len(values) * w).reshape(-1, w) > 0
  top, left = rows.argmax(1), cols.argmax(1)
  bottom, right = h - rows[:, ::-1].argmax(1), w - cols[:, ::-1].argmax(1)
  segments = []
  for k in np.flatnonzero(values >= 0):
    c = int(category[k])
    segments.append(Segment(len(segments) + 1, info.categories[c], int(renumbered[k] - c * info.label_divisor),
                            bool(is_thing[k]), int(area[k]),
                            (int(left[k]), int(top[k]), int(right[k] - left[k]), int(bottom[k] - top[k])),
                            float(scores[int(values[k])])))
  return renumbered[inverse].astype(np.int32), SegmentList(h, w, tuple(segments))


def encode_segments(segments: SegmentList) -> bytes:
  """segments/<stem>.json bytes: one segment per line, readable and diffable."""
  lines = [json.dumps(dataclasses.asdict(s)) for s in segments.segments]
  return (f'{{"height": {segments.height}, "width": {segments.width}, "segments": [\n' + ",\n".join(lines)
          + "\n]}\n").encode()


def _field(entry: dict, name: str, kind: type, where: str, minimum: int | None = None):
  """entry[name] checked to be of `kind` (an int for int: not a bool) and >= minimum."""
  value = entry.get(name)
  ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
  if ok and minimum is not None:
    ok = value >= minimum
  if not ok:
    expected = {int: "an integer", str: "a string", bool: "true or false"}[kind]
    expected += f" >= {minimum}" if minimum is not None else ""
    raise FormatError(f"{where}.{name}: expected {expected}, found {value!r}")
  return value


def decode_segments(data: bytes, info: DatasetInfo, where: str = "segments") -> SegmentList:
  """Parses segments/<stem>.json.

  Raises:
    FormatError: naming the file and field (e.g. `.../a.json: segments[3].score`): not JSON, a missing or mistyped
      field, an unknown category, isthing not as metadata.yaml says, or one (category, instance) listed twice.
  """
  try:
    doc = json.loads(data)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise FormatError(f"{where}: not valid JSON: {e}") from None
  if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
    raise FormatError(f"{where}: expected an object with height, width and a 'segments' list, found "
                      f"{type(doc).__name__}{'' if not isinstance(doc, dict) else ' without a segments list'}")
  height, width = _field(doc, "height", int, where, 1), _field(doc, "width", int, where, 1)
  thing_of = dict(zip(info.categories, info.is_thing))
  segments, seen = [], set()
  for i, entry in enumerate(doc["segments"]):
    at = f"{where}: segments[{i}]"
    if not isinstance(entry, dict):
      raise FormatError(f"{at}: expected an object, found {entry!r}")
    category = _field(entry, "category", str, at)
    if category not in thing_of:
      raise FormatError(f"{at}.category: {category!r} is not in metadata.yaml's categories {list(info.categories)}")
    instance = _field(entry, "instance", int, at, 0)
    isthing = _field(entry, "isthing", bool, at)
    if isthing != thing_of[category]:
      role = "a thing" if thing_of[category] else "stuff"
      raise FormatError(f"{at}.isthing: expected {str(thing_of[category]).lower()} (metadata.yaml lists {category!r} "
                        f"as {role}), found {str(isthing).lower()}")
    key = (category, instance if isthing else 0)
    if key in seen:
      raise FormatError(f"{at}: {category!r} instance {instance} is listed twice")
    seen.add(key)
    bbox = entry.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in bbox)):
      raise FormatError(f"{at}.bbox: expected [x, y, w, h] of integers >= 0, found {bbox!r}")
    score = entry.get("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
      raise FormatError(f"{at}.score: expected a finite number, found {score!r}")
    segments.append(Segment(_field(entry, "id", int, at, 1), category, instance, isthing,
                            _field(entry, "area", int, at, 0), tuple(bbox), float(score)))
  return SegmentList(height, width, tuple(segments))


# ----------------------------------------------------------------------------------------------------------------------
# Images


def decode_image(data: bytes, where: str = "image", apply_exif: bool = False) -> np.ndarray:
  """Decodes an image file (JPEG, PNG, BMP, WebP, ...; any mode) into uint8 [H, W, 3] RGB.

  - 8-bit RGB: the stored values.
  - 16-bit samples are scaled by the full range, never clipped: gray (modes I;16, I;16B, ..., and I, which Pillow
    uses for 16-bit samples too) becomes round(v / 257), so 65535 -> 255 and 32896 -> 128. 16-bit colour PNGs
    (RGB, RGBA, gray + alpha) Pillow itself reduces to the high byte v >> 8 while decoding, which differs from
    round(v / 257) by at most one level; there is no 16-bit RGB mode in Pillow to do better from.
  - Grayscale (1, L, LA, I;16): the gray value in all three channels.
  - Alpha (RGBA, LA, PA, P with a transparent index) is dropped: the model sees the colour channels as stored. No
    background is composited in, since any background colour would be invented for the transparent pixels.
  - Palette (P), CMYK, YCbCr: converted to RGB by Pillow.

  Args:
    data: the file's bytes.
    where: the file's name for error messages.
    apply_exif: turn the image as its EXIF orientation tag says, as image viewers show it (width and height swap for
      orientations 5-8). The prediction command does so for plain image files and folders. A dataset in the project's
      format keeps the stored pixel grid (training and evaluation never apply it), because its annotations refer to
      that grid.

  Returns:
    uint8 [H, W, 3], H x W after the EXIF turn when `apply_exif`.

  Raises:
    FormatError: naming the file, when Pillow cannot decode it (not an image, corrupt, truncated).
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      if apply_exif:
        ImageOps.exif_transpose(image, in_place=True)
      return _rgb_array(image)
  except Exception as e:  # Pillow raises several types for corrupt input.
    raise FormatError(f"{where}: cannot decode as an image: {type(e).__name__}: {e}") from None


def _rgb_array(image: Image.Image) -> np.ndarray:
  """uint8 [H, W, 3] of a decoded image of any mode (see `decode_image`)."""
  if image.mode.startswith("I"):  # Pillow's convert("RGB") would clip these 16-bit samples at 255.
    samples = np.clip(np.asarray(image).astype(np.int32), 0, 65535)  # A no-op for I;16; bounds 32-bit I.
    gray = ((samples + 128) // 257).astype(np.uint8)  # round(v / 257): 257 is odd, so there are no ties.
    return np.repeat(gray[..., None], 3, axis=-1)
  if image.mode in ("P", "PA"):
    image = image.convert("RGBA")  # Pillow converts a palette with transparency given per entry only to RGBA.
  return np.asarray(image.convert("RGB"))


def encode_image(image: np.ndarray, ext: str = ".jpg", quality: int = 92) -> bytes:
  """Encodes uint8 [H, W, 3] as the format implied by `ext` ('.jpg', '.png', ...)."""
  buffer = io.BytesIO()
  fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}[ext.lower()]
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
  return buffer.getvalue()
