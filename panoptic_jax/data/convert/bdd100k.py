"""BDD100K panoptic segmentation (pan_seg bitmasks) -> the project's dataset format.

  python -m panoptic_jax.data.convert bdd100k --root BDD100K/bdd100k --split val --out data/bdd100k/val \
      [--images DIR] [--bitmasks DIR] [--crowd ignore|keep] [--endpoint_url URL] [--workers N]

Inputs, under --root (the layout of the official downloads, bdd100k doc/source/download.rst, "10K Images" and
"Panoptic Segmentation"):
  images/10k/<split>/<name>.jpg                    images (or --images DIR; its files, not its subfolders)
  labels/pan_seg/bitmasks/<split>/<name>.png       panoptic bitmasks (or --bitmasks DIR)
<split> is train or val (the test split has no public labels). Output names are the shared stem: images/<name>.jpg
and panoptic_maps/<name>.tif pair up. An image without a bitmask is reported as unpaired; a bitmask without an image
fails with the reason.

Facts relied on (the BDD100K toolkit, github.com/bdd100k/bdd100k at 9ac17c6):
- Bitmask PNG (doc/source/format.rst, "Instance Segmentation"; bdd100k/common/bitmask.py parse_bitmask): RGBA,
  R = category id, G = attributes `(truncated << 3) + (occluded << 2) + (crowd << 1) + ignore`, instance id
  `(B << 8) + A`. Instance id 0 is the background (unlabeled, R = 0): void here. Every pixel of one instance id has
  the same category and attributes (the evaluator asserts it); a bitmask that breaks this fails with the reason.
  The toolkit's own bitmasks (label/to_mask.py panseg_to_bitmasks) give stuff the instance id of its category
  (1..30) and things ids 31, 32, ... per image; nothing here depends on those ranges.
- Categories (format.rst "Panoptic Segmentation", label/label.py `labels`, configs/pan_seg.toml): 40 evaluated
  classes, ids 1..40 in label.py order, plus 0 = unlabeled (void). Ids 1-30 are stuff, 31-40 (person, rider,
  bicycle, bus, car, caravan, motorcycle, trailer, train, truck: hasInstances) are things. Unlike BDD100K semantic
  segmentation (19 train ids), pan_seg evaluates all 40, including dynamic, ego vehicle, caravan and trailer
  (eval/pan_seg.py averages over labels[1:]), so all 40 become categories 0..39 here, in id order.
- Colours: label.py's. Its table gives ego vehicle and static black, which the format reserves for void: they get
  generated colours. It repeats (220, 20, 60) for parking sign and person and (153, 153, 153) for pole and
  polegroup: the 19 classes that also have a Cityscapes train id (trainId != 255) keep theirs and the others move to
  the nearest free colour (common.resolve_colors, which logs each change).
- Crowd and ignore (the `crowd` and `ignore` attribute bits): the evaluator (eval/pan_seg.py pq_per_image) leaves
  segments with `attributes & 3` out of matching and does not count a prediction lying mostly over them (or over
  unlabeled pixels) as a false positive; the toolkit's COCO conversion (label/to_coco_panseg.py) marks them
  `iscrowd = crowd or ignored`. Both bits are therefore crowd here (`--crowd`):
  * `ignore` (default): their pixels are void, which is what the evaluator does with them.
  * `keep`: they keep their category with on-disk instance id 0, as the COCO converter does (see coco.py).
- Things get on-disk instance ids 1..K per image in increasing order of their bitmask instance id (the toolkit's
  order, to_coco.bitmasks_loader), so decoding numbers each class's instances in that order; all segments of a stuff
  class in an image merge into one (to_coco_panseg.py merges them too). A category id above 40 in R fails the image.
- Not read: the Scalabel polygon JSONs (labels/pan_seg/polygons/pan_seg_<split>.json). Their poly2d outlines hold
  cubic Bezier segments and overlap in drawing order; the toolkit rasterises them with matplotlib (label/to_mask.py)
  into the very bitmasks shipped beside them, which are what its evaluator reads. To convert polygons only, make
  bitmasks first with `python -m bdd100k.label.to_mask -m pan_seg -i pan_seg_<split>.json -o <bitmask dir>`.
- Images are copied byte for byte.
"""

from __future__ import annotations

import functools
import pathlib
from typing import NamedTuple

import numpy as np

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import common



class Label(NamedTuple):
  name: str
  label_id: int
  cityscapes_train_id: int  # 255: not one of the 19 Cityscapes-style semantic classes.
  is_thing: bool
  color: tuple[int, int, int]


# bdd100k/label/label.py `labels` without "unlabeled" (id 0): name, id, trainId, hasInstances, color.
LABELS = (
    Label("dynamic", 1, 255, False, (111, 74, 0)),
    Label("ego vehicle", 2, 255, False, (0, 0, 0)),
    Label("ground", 3, 255, False, (81, 0, 81)),
    Label("static", 4, 255, False, (0, 0, 0)),
    Label("parking", 5, 255, False, (250, 170, 160)),
    Label("rail track", 6, 255, False, (230, 150, 140)),
    Label("road", 7, 0, False, (128, 64, 128)),
    Label("sidewalk", 8, 1, False, (244, 35, 232)),
    Label("bridge", 9, 255, False, (150, 100, 100)),
    Label("building", 10, 2, False, (70, 70, 70)),
    Label("fence", 11, 4, False, (190, 153, 153)),
    Label("garage", 12, 255, False, (180, 100, 180)),
    Label("guard rail", 13, 255, False, (180, 165, 180)),
    Label("tunnel", 14, 255, False, (150, 120, 90)),
    Label("wall", 15, 3, False, (102, 102, 156)),
    Label("banner", 16, 255, False, (250, 170, 100)),
    Label("billboard", 17, 255, False, (220, 220, 250)),
    Label("lane divider", 18, 255, False, (255, 165, 0)),
    Label("parking sign", 19, 255, False, (220, 20, 60)),
    Label("pole", 20, 5, False, (153, 153, 153)),
    Label("polegroup", 21, 255, False, (153, 153, 153)),
    Label("street light", 22, 255, False, (220, 220, 100)),
    Label("traffic cone", 23, 255, False, (255, 70, 0)),
    Label("traffic device", 24, 255, False, (220, 220, 220)),
    Label("traffic light", 25, 6, False, (250, 170, 30)),
    Label("traffic sign", 26, 7, False, (220, 220, 0)),
    Label("traffic sign frame", 27, 255, False, (250, 170, 250)),
    Label("terrain", 28, 9, False, (152, 251, 152)),
    Label("vegetation", 29, 8, False, (107, 142, 35)),
    Label("sky", 30, 10, False, (70, 130, 180)),
    Label("person", 31, 11, True, (220, 20, 60)),
    Label("rider", 32, 12, True, (255, 0, 0)),
    Label("bicycle", 33, 18, True, (119, 11, 32)),
    Label("bus", 34, 15, True, (0, 60, 100)),
    Label("car", 35, 13, True, (0, 0, 142)),
    Label("caravan", 36, 255, True, (0, 0, 90)),
    Label("motorcycle", 37, 17, True, (0, 0, 230)),
    Label("trailer", 38, 255, True, (0, 0, 110)),
    Label("train", 39, 16, True, (0, 80, 100)),
    Label("truck", 40, 14, True, (0, 0, 70)),
)
UNLABELED_ID = 0
MAX_CATEGORY_ID = 40
CROWD_BIT, IGNORE_BIT = 2, 1  # G = (truncated << 3) + (occluded << 2) + (crowd << 1) + ignore.
# Bitmask category id -> category index; 0 (unlabeled) is void.
CATEGORY_INDEX = {UNLABELED_ID: fmt.VOID, **{label.label_id: i for i, label in enumerate(LABELS)}}

DEFAULT_IMAGES = ("images", "10k")
DEFAULT_BITMASKS = ("labels", "pan_seg", "bitmasks")


@functools.lru_cache(maxsize=1)  # resolve_colors logs each change: once per process is enough.
def _colors() -> tuple[common.Color, ...]:
  """label.py's colours made unique and non-black; the Cityscapes-shared classes keep theirs (see the module doc)."""
  order = sorted(range(len(LABELS)), key=lambda i: (LABELS[i].cityscapes_train_id == 255, i))
  resolved = common.resolve_colors([LABELS[i].name for i in order],
                                   [LABELS[i].color if LABELS[i].color != (0, 0, 0) else None for i in order])
  colors: list[common.Color] = [(0, 0, 0)] * len(LABELS)
  for i, color in zip(order, resolved):
    colors[i] = color
  return tuple(colors)


def dataset_info() -> fmt.DatasetInfo:
  return fmt.DatasetInfo(categories=tuple(label.name for label in LABELS), colors=_colors(),
                         is_thing=tuple(label.is_thing for label in LABELS))


# ----------------------------------------------------------------------------------------------------------------------
# Per example (in workers)


def _segments(bitmask: np.ndarray, png: str) -> tuple[np.ndarray, tuple[dict[str, int], ...]]:
  """RGBA bitmask [H, W, 4] -> ([H, W] instance ids, COCO-style segments_info sorted by id), checked.

  Raises:
    common.ConversionError: naming the file, for an instance id with several categories or attribute values, or a
      category id above 40.
  """
  bitmask = bitmask.astype(np.int64)
  category, attributes = bitmask[..., 0], bitmask[..., 1]
  ids = (bitmask[..., 2] << 8) | bitmask[..., 3]
  # One category and one attribute value per instance id: scatter one pixel's values per id, compare every pixel.
  code = (category << 8) | attributes
  code_of = np.zeros(1 << 16, np.int64)
  code_of[ids] = code
  mixed = (code_of[ids] != code) & (ids != 0)
  if mixed.any():
    bad = int(ids[mixed][0])
    pairs = np.unique(code[ids == bad])
    shown = ", ".join(f"(category {p >> 8}, attributes {p & 255})" for p in pairs[:5].tolist())
    raise common.ConversionError(f"annotation {png}: instance id {bad} has {len(pairs)} (category, attributes) "
                                 f"values: {shown}; a BDD100K bitmask gives each instance one of each")
  areas = np.bincount(ids.ravel(), minlength=1 << 16)
  present = np.flatnonzero(areas[1:]) + 1  # Instance id 0: the background, void.
  codes = code_of[present]
  too_high = present[(codes >> 8) > MAX_CATEGORY_ID]
  if len(too_high):
    raise common.ConversionError(f"annotation {png}: instance id {int(too_high[0])} has category id "
                                 f"{int(code_of[too_high[0]] >> 8)} (R); BDD100K panoptic category ids are "
                                 f"0..{MAX_CATEGORY_ID}")
  segments = tuple({"id": int(i), "category_id": int(c >> 8), "area": int(areas[i]),
                    "iscrowd": int((c & (CROWD_BIT | IGNORE_BIT)) != 0)} for i, c in zip(present, codes))
  return ids, segments


def convert_bitmask(example: common.Example, info: fmt.DatasetInfo,
                    crowd: str = "ignore") -> tuple[bytes, np.ndarray, dict[str, int]]:
  """One pan_seg bitmask PNG -> (image bytes, int32 [H, W] canonical map, segment counts).

  Raises:
    common.ConversionError: naming the file, for unreadable or undecodable files, a PNG that is not 8-bit RGBA,
      sizes that differ, an instance with several categories or attribute values, or an unknown category id.
  """
  png = example.annotation_path
  bitmask = common.decode_png(common.read_file(png, "annotation"), png, "annotation")
  if bitmask.ndim != 3 or bitmask.shape[-1] != 4 or bitmask.dtype != np.uint8:
    raise common.ConversionError(f"annotation {png}: expected an 8-bit RGBA bitmask PNG (R category, G attributes, "
                                 f"B * 256 + A instance id), found shape {bitmask.shape} {bitmask.dtype}")
  image_bytes = common.read_file(example.image_path, "image")
  common.check_image(image_bytes, example.image_path, bitmask.shape[:2], None)
  ids, segments = _segments(bitmask, png)
  panoptic, stats = common.panoptic_from_segments(ids, segments, CATEGORY_INDEX, info, crowd, png)
  return image_bytes, panoptic, stats


# ----------------------------------------------------------------------------------------------------------------------
# Finding the files


def _index(folder: pathlib.Path, extensions: tuple[str, ...]) -> dict[str, pathlib.Path]:
  """stem -> file, for the files directly inside `folder` with one of `extensions` (any letter case)."""
  found: dict[str, pathlib.Path] = {}
  for path in sorted(folder.iterdir()):
    if path.is_file() and path.suffix.lower() in extensions and not path.name.startswith("."):
      if path.stem in found:
        raise ValueError(f"{folder}: two files for {path.stem}: {found[path.stem].name} and {path.name}")
      found[path.stem] = path
  return found


def find_examples(root: str, split: str, *, images: str | None = None, bitmasks: str | None = None
                  ) -> tuple[list[common.Example], list[tuple[str, str]], list[tuple[str, str]]]:
  """Pairs images and bitmasks by stem. Returns (examples, failed, unpaired)."""
  root_path = pathlib.Path(root)
  images_dir = pathlib.Path(images) if images else root_path.joinpath(*DEFAULT_IMAGES, split)
  bitmasks_dir = pathlib.Path(bitmasks) if bitmasks else root_path.joinpath(*DEFAULT_BITMASKS, split)
  if not images_dir.is_dir():
    raise ValueError(f"images folder {images_dir} does not exist (expected {'/'.join(DEFAULT_IMAGES)}/<split>/*.jpg "
                     "under --root, or pass --images)")
  if not bitmasks_dir.is_dir():
    raise ValueError(f"bitmask folder {bitmasks_dir} does not exist (expected {'/'.join(DEFAULT_BITMASKS)}/<split>/"
                     "*.png under --root, or pass --bitmasks; the test split has no public labels)")
  image_of = _index(images_dir, fmt.IMAGE_EXTENSIONS)
  bitmask_of = _index(bitmasks_dir, (".png",))
  examples, failed = [], []
  for stem, path in bitmask_of.items():
    if stem not in image_of:
      failed.append((path.name, f"no image {stem}.jpg (or another image extension) in {images_dir}"))
      continue
    examples.append(common.Example(stem=stem, image_path=str(image_of[stem]), annotation_path=str(path)))
  unpaired = [(p.name, "image without bitmask") for s, p in image_of.items() if s not in bitmask_of]
  return examples, failed, unpaired


def convert(root: str, split: str, out: str, *, images: str | None = None, bitmasks: str | None = None,
            crowd: str = "ignore", endpoint_url: str | None = None, workers: int = 1,
            progress: bool = True, label_space: common.LabelSpace | None = None) -> common.Summary:
  """Converts one BDD100K pan_seg split into the dataset at `out` (a folder or s3://bucket/prefix); see the module doc.

  Args:
    root: the BDD100K root holding images/10k/ and labels/pan_seg/ (the `bdd100k` folder of the downloads).
    split: train or val (a folder under images/10k/ and labels/pan_seg/bitmasks/).
    out: the output location, a folder or s3://bucket/prefix.
    images: the images folder, instead of ROOT/images/10k/SPLIT.
    bitmasks: the bitmask folder, instead of ROOT/labels/pan_seg/bitmasks/SPLIT.
    crowd: `ignore` (crowd- or ignore-flagged segments become void) or `keep` (they keep their category, id 0).
    endpoint_url: the S3 endpoint for s3:// outputs.
    workers: worker processes; 0 or 1 converts in this process.
    progress: show a progress bar.

  Returns:
    The run's Summary (converted, skipped, failed with reasons, unpaired images, segment counts).
  """
  common.check_arguments(crowd, split)
  examples, failed, unpaired = find_examples(root, split, images=images, bitmasks=bitmasks)
  return common.run_conversion(
      examples, dataset_info(), convert_bitmask, out=out, endpoint_url=endpoint_url, workers=workers,
      options={"crowd": crowd}, failed=failed, unpaired=unpaired, progress=progress,
      label_space=label_space,
      provenance=f"converted from BDD100K pan_seg {split} (bitmasks) with --crowd {crowd}")
