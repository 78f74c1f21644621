"""Cityscapes (gtFine) -> the project's dataset format.

  python -m panoptic_jax.data.convert cityscapes --root CITYSCAPES --split val --out data/cityscapes/val \
      [--layout auto|instance_ids|panoptic] [--images DIR] [--panoptic_json FILE --panoptic_dir DIR] \
      [--crowd ignore|keep] [--endpoint_url URL] [--workers N]

Inputs, under --root (the official layout):
  leftImg8bit/<split>/<city>/<name>_leftImg8bit.png                     images (or --images DIR, searched recursively)
  gtFine/<split>/<city>/<name>_gtFine_instanceIds.png                    layout `instance_ids`
  gtFine/cityscapes_panoptic_<split>[_trainId].json + the folder of the same name with <name>_gtFine_panoptic.png
                                                                         layout `panoptic` (cityscapesScripts
                                                                         createPanopticImgs output)
`auto` takes instanceIds when gtFine/<split> holds any, else the panoptic JSON. Output names drop the suffixes:
images/<name>.png and panoptic_maps/<name>.tif pair up.

Conventions (DeepLab2's build_cityscapes_data.py, docs/metrics.md):
- 19 categories in train-id order with the official colours of cityscapesScripts helpers/labels.py; things are
  person, rider, car, truck, bus, train, motorcycle, bicycle (train ids 11-18).
- instanceIds: value < 1000 is a label id without instance (stuff, or a crowd group of a thing class); value >= 1000
  is label_id * 1000 + instance. Labels with ignoreInEval (train id 255) become void.
- panoptic PNG + JSON: id = R + 256 G + 256^2 B with `segments_info` (category_id, iscrowd, area); category_id is a
  train id when the JSON's categories say so (or, without categories, when the file name ends in `_trainId`), else
  a label id. Areas are checked as for COCO.
- Crowd (`--crowd`): `ignore` (default) makes crowd groups void; `keep` keeps their category with on-disk id 0, as
  the COCO converter does (see coco.py).
- Thing instances get on-disk ids 1..K per image in increasing order of their source id (instanceIds) or in
  `segments_info` order (panoptic), so decoding numbers each class's instances in their source order.
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import NamedTuple

import numpy as np

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import common

LAYOUTS = ("auto", "instance_ids", "panoptic")


class Label(NamedTuple):
  name: str
  label_id: int
  train_id: int
  is_thing: bool
  color: tuple[int, int, int]


# The 19 evaluated classes of cityscapesScripts helpers/labels.py, in train-id order.
LABELS = (
    Label("road", 7, 0, False, (128, 64, 128)),
    Label("sidewalk", 8, 1, False, (244, 35, 232)),
    Label("building", 11, 2, False, (70, 70, 70)),
    Label("wall", 12, 3, False, (102, 102, 156)),
    Label("fence", 13, 4, False, (190, 153, 153)),
    Label("pole", 17, 5, False, (153, 153, 153)),
    Label("traffic light", 19, 6, False, (250, 170, 30)),
    Label("traffic sign", 20, 7, False, (220, 220, 0)),
    Label("vegetation", 21, 8, False, (107, 142, 35)),
    Label("terrain", 22, 9, False, (152, 251, 152)),
    Label("sky", 23, 10, False, (70, 130, 180)),
    Label("person", 24, 11, True, (220, 20, 60)),
    Label("rider", 25, 12, True, (255, 0, 0)),
    Label("car", 26, 13, True, (0, 0, 142)),
    Label("truck", 27, 14, True, (0, 0, 70)),
    Label("bus", 28, 15, True, (0, 60, 100)),
    Label("train", 31, 16, True, (0, 80, 100)),
    Label("motorcycle", 32, 17, True, (0, 0, 230)),
    Label("bicycle", 33, 18, True, (119, 11, 32)),
)
NUM_LABEL_IDS = 34  # Label ids 0..33; those not in LABELS (unlabeled, ego vehicle, ..., caravan, trailer) are void.
IGNORE_TRAIN_ID = 255
_LABEL_TO_INDEX = {label.label_id: label.train_id for label in LABELS}
_NAME_TO_INDEX = {label.name: label.train_id for label in LABELS}

IMAGE_SUFFIX = "_leftImg8bit.png"
INSTANCE_IDS_SUFFIX = "_gtFine_instanceIds.png"
PANOPTIC_SUFFIX = "_gtFine_panoptic.png"


def dataset_info() -> fmt.DatasetInfo:
  return fmt.DatasetInfo(categories=tuple(label.name for label in LABELS),
                         colors=tuple(label.color for label in LABELS),
                         is_thing=tuple(label.is_thing for label in LABELS))


def _strip(name: str, suffix: str) -> str | None:
  return name[:-len(suffix)] if name.endswith(suffix) else None


# ----------------------------------------------------------------------------------------------------------------------
# Per example (in workers)


def convert_instance_ids(example: common.Example, info: fmt.DatasetInfo,
                         crowd: str = "ignore") -> tuple[bytes, np.ndarray, dict[str, int]]:
  """One `*_gtFine_instanceIds.png` -> (image bytes, int32 [H, W] canonical map, segment counts)."""
  png = example.annotation_path
  ids = common.decode_png(common.read_file(png, "annotation"), png, "annotation")
  if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
    raise common.ConversionError(f"annotation {png}: expected a single-channel integer instanceIds PNG, found shape "
                                 f"{ids.shape} {ids.dtype}")
  image_bytes = common.read_file(example.image_path, "image")
  common.check_image(image_bytes, example.image_path, ids.shape, None)

  low, high = int(ids.min(initial=0)), int(ids.max(initial=0))
  if low < 0 or high >= NUM_LABEL_IDS * 1000:
    bad = low if low < 0 else high
    raise common.ConversionError(f"annotation {png}: value {bad} has label id {bad if bad < 1000 else bad // 1000}; "
                                 f"instanceIds hold label ids 0..{NUM_LABEL_IDS - 1} or label_id * 1000 + instance")
  ids = ids.astype(np.int64, copy=False)
  present = np.flatnonzero(np.bincount(ids.ravel()))  # Sorted; values < 34000 (checked above): a dense histogram.
  values: dict[int, int] = {}
  stats: collections.Counter = collections.Counter()
  next_instance = 1
  for v in present.tolist():  # Increasing: instances of a class in their source order.
    label_id = v if v < 1000 else v // 1000
    if label_id >= NUM_LABEL_IDS:
      raise common.ConversionError(f"annotation {png}: value {v} has label id {label_id}; Cityscapes label ids are "
                                   f"0..{NUM_LABEL_IDS - 1}")
    category = _LABEL_TO_INDEX.get(label_id)
    if category is None:
      continue  # ignoreInEval -> void.
    if not info.is_thing[category]:
      values[v] = category * info.label_divisor
    elif v < 1000:  # A thing class without instance id: a crowd group.
      stats[f"crowd {'kept' if crowd == 'keep' else 'to void'}"] += 1
      if crowd == "keep":
        values[v] = category * info.label_divisor
    else:
      values[v] = category * info.label_divisor + next_instance
      next_instance += 1
      stats["thing instances"] += 1
  stats["stuff segments"] += sum(1 for v in values.values() if not info.is_thing[v // info.label_divisor])
  common.check_instance_count(next_instance - 1, info, png)
  lut = np.full(int(present[-1]) + 1 if len(present) else 1, fmt.VOID, np.int32)
  for v, value in values.items():
    lut[v] = value
  return image_bytes, lut[ids], stats


def convert_panoptic(example: common.Example, info: fmt.DatasetInfo, category_index: dict[int, int],
                     crowd: str = "ignore") -> tuple[bytes, np.ndarray, dict[str, int]]:
  """One cityscapesScripts panoptic PNG + its segments_info -> (image bytes, int32 [H, W] canonical map, counts)."""
  png = example.annotation_path
  ids = common.rgb_ids(common.decode_png(common.read_file(png, "annotation"), png, "annotation"), png, "annotation")
  image_bytes = common.read_file(example.image_path, "image")
  common.check_image(image_bytes, example.image_path, ids.shape, None)
  panoptic, stats = common.panoptic_from_segments(ids, example.segments or (), category_index, info, crowd, png)
  return image_bytes, panoptic, stats


# ----------------------------------------------------------------------------------------------------------------------
# Finding the files


def _index_images(images_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  images: dict[str, pathlib.Path] = {}
  for path in sorted(images_dir.rglob(f"*{IMAGE_SUFFIX}")):
    stem = _strip(path.name, IMAGE_SUFFIX)
    if stem in images:
      raise ValueError(f"{images_dir}: two images named {path.name}: {images[stem]} and {path}")
    images[stem] = path
  return images


def _panoptic_category_index(data: dict, json_path: pathlib.Path) -> dict[int, int]:
  """category_id -> train-id index (VOID for ignored classes), from the JSON's categories or its name."""
  categories = data.get("categories")
  if categories:
    index = {}
    for category in categories:
      if not isinstance(category, dict) or not isinstance(category.get("id"), int):
        raise ValueError(f"{json_path}: categories: expected objects with an integer id and a name, found "
                         f"{category!r:.200}")
      index[category["id"]] = _NAME_TO_INDEX.get(str(category.get("name")), fmt.VOID)
    return index
  if json_path.stem.endswith("_trainId"):
    return {**{label.train_id: label.train_id for label in LABELS}, IGNORE_TRAIN_ID: fmt.VOID}
  return {label_id: _LABEL_TO_INDEX.get(label_id, fmt.VOID) for label_id in range(NUM_LABEL_IDS)}


def _find_panoptic_json(root: pathlib.Path, split: str) -> pathlib.Path | None:
  for name in (f"cityscapes_panoptic_{split}_trainId.json", f"cityscapes_panoptic_{split}.json"):
    if (root / "gtFine" / name).is_file():
      return root / "gtFine" / name
  return None


def find_examples(root: str, split: str, *, layout: str = "auto", images: str | None = None,
                  panoptic_json: str | None = None, panoptic_dir: str | None = None):
  """Finds and pairs images and annotations. Returns (layout, examples, options, failed, unpaired)."""
  root_path = pathlib.Path(root)
  images_dir = pathlib.Path(images) if images else root_path / "leftImg8bit" / split
  if not images_dir.is_dir():
    raise ValueError(f"images folder {images_dir} does not exist (expected leftImg8bit/<split>/<city>/*{IMAGE_SUFFIX} "
                     "under --root, or pass --images)")
  image_of = _index_images(images_dir)
  gt_split = root_path / "gtFine" / split
  if layout == "auto":
    if panoptic_json:
      layout = "panoptic"
    elif gt_split.is_dir() and next(gt_split.rglob(f"*{INSTANCE_IDS_SUFFIX}"), None) is not None:
      layout = "instance_ids"
    elif _find_panoptic_json(root_path, split) is not None:
      layout = "panoptic"
    else:
      raise ValueError(f"found neither {gt_split}/<city>/*{INSTANCE_IDS_SUFFIX} nor "
                       f"{root_path / 'gtFine'}/cityscapes_panoptic_{split}[_trainId].json")

  annotations: dict[str, tuple[pathlib.Path, tuple | None]] = {}
  options: dict = {}
  failed: list[tuple[str, str]] = []
  if layout == "instance_ids":
    for path in sorted(gt_split.rglob(f"*{INSTANCE_IDS_SUFFIX}")):
      annotations[_strip(path.name, INSTANCE_IDS_SUFFIX)] = (path, None)
  elif layout == "panoptic":
    json_path = pathlib.Path(panoptic_json) if panoptic_json else _find_panoptic_json(root_path, split)
    if json_path is None or not json_path.is_file():
      raise ValueError(f"panoptic JSON {json_path or root_path / 'gtFine' / f'cityscapes_panoptic_{split}.json'} "
                       "does not exist")
    png_dir = pathlib.Path(panoptic_dir) if panoptic_dir else json_path.with_suffix("")
    try:
      data = json.loads(json_path.read_bytes())
    except (OSError, json.JSONDecodeError) as e:
      raise ValueError(f"{json_path}: cannot read as JSON: {e}") from None
    if not isinstance(data, dict):
      raise ValueError(f"{json_path}: expected a panoptic JSON object with annotations, found {type(data).__name__}")
    options["category_index"] = _panoptic_category_index(data, json_path)
    for i, annotation in enumerate(data.get("annotations", [])):
      if not isinstance(annotation, dict) or "file_name" not in annotation:
        failed.append((f"{json_path.name} annotations[{i}]", f"expected an object with file_name, found "
                       f"{annotation!r:.200}"))
        continue
      file_name = str(annotation["file_name"])
      stem = _strip(file_name, PANOPTIC_SUFFIX) or str(annotation.get("image_id", pathlib.PurePath(file_name).stem))
      segments = annotation.get("segments_info", [])
      if not isinstance(segments, list) or not all(isinstance(x, dict) for x in segments):
        failed.append((file_name, f"segments_info: expected a list of objects, found {segments!r:.200}"))
        continue
      segments = tuple({k: x.get(k) for k in ("id", "category_id", "iscrowd", "area")} for x in segments)
      annotations[stem] = (png_dir / file_name, segments)
  else:
    raise ValueError(f"layout: expected one of {LAYOUTS}, found {layout!r}")

  examples = []
  for stem, (path, segments) in annotations.items():
    if stem not in image_of:
      failed.append((path.name, f"no image {stem}{IMAGE_SUFFIX} under {images_dir}"))
      continue
    examples.append(common.Example(stem=stem, image_path=str(image_of[stem]), annotation_path=str(path),
                                   segments=segments))
  unpaired = [(p.name, "image without annotation") for s, p in image_of.items() if s not in annotations]
  return layout, examples, options, failed, unpaired


def convert(root: str, split: str, out: str, *, layout: str = "auto", images: str | None = None,
            panoptic_json: str | None = None, panoptic_dir: str | None = None, crowd: str = "ignore",
            endpoint_url: str | None = None, workers: int = 1, progress: bool = True,
            label_space: common.LabelSpace | None = None) -> common.Summary:
  """Converts one Cityscapes split into the dataset at `out` (a folder or s3://bucket/prefix); see the module doc."""
  common.check_arguments(crowd, split)
  layout, examples, options, failed, unpaired = find_examples(
      root, split, layout=layout, images=images, panoptic_json=panoptic_json, panoptic_dir=panoptic_dir)
  convert_fn = convert_instance_ids if layout == "instance_ids" else convert_panoptic
  return common.run_conversion(
      examples, dataset_info(), convert_fn, out=out, endpoint_url=endpoint_url, workers=workers,
      options={**options, "crowd": crowd}, failed=failed, unpaired=unpaired, progress=progress,
      label_space=label_space,
      provenance=f"converted from Cityscapes {split} ({layout}) with --crowd {crowd}")
