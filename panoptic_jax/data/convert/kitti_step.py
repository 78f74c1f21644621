"""KITTI-STEP (Segmenting and Tracking Every Pixel) -> the project's dataset format.

  python -m panoptic_jax.data.convert kitti_step --root KITTI_STEP --split val --out data/kitti_step/val \
      [--images DIR] [--panoptic_maps DIR] [--crowd ignore|keep] [--endpoint_url URL] [--workers N]

Inputs, under --root (the layout of DeepLab2's g3doc/setup/kitti_step.md, read by its data/build_step_data.py):
  images/<split>/<sequence>/<frame>.png           KITTI tracking images (image_02), %04d sequences, %06d frames
                                                  (or --images DIR, holding <sequence>/<frame>.{png,jpg,jpeg})
  panoptic_maps/<split>/<sequence>/<frame>.png    from kitti-step.tar.gz (or --panoptic_maps DIR, same shape)
Splits: train (12 sequences), val (9 sequences: 0002 0006 0007 0008 0010 0013 0014 0016 0018, moved out of the
KITTI training images); test has images only, so there is nothing to convert (an error says so). A frame's image
and map pair up by <sequence>/<frame>; the output names join them, images/<sequence>_<frame>.png and
panoptic_maps/<sequence>_<frame>.tif, since frame names repeat across sequences. Images without a map are reported
unpaired; maps without an image fail.

Facts relied on (DeepLab2: g3doc/setup/kitti_step.md, data/build_step_data.py, data/utils/create_step_panoptic_maps.py,
data/dataset.py KITTI_STEP_INFORMATION, evaluation/segmentation_and_tracking_quality.py):
- Encoding: an RGB PNG with R = semantic id, G = instance_id // 256, B = instance_id % 256 (DeepLab2 decodes
  semantic * 1000 + G * 256 + B, so its instance ids are < 1000).
- Semantic ids are the 19 Cityscapes train ids (road 0 ... bicycle 18) and 255 = void. The categories, their order
  and colours are cityscapes.LABELS (cityscapesScripts helpers/labels.py).
- Only person (11) and car (13) carry instances (`class_has_instances_list=(11, 13)`): their ids are KITTI-MOTS track
  ids + 1, constant along a sequence. These two are this dataset's things; rider, truck, bus, train, motorcycle and
  bicycle are annotated semantically only, so they are stuff here (one segment per class and image), unlike
  in the Cityscapes conversion.
- Instance id 0 on person / car marks a `crowd` region (pixels of the class without a MOTS track); STQ ignores it for
  the association term and DeepLab2's training treats it as crowd (no centre or offset targets). Other classes
  always have instance 0; void pixels may carry any id.
- Crowd (`--crowd`): `ignore` (default) makes crowd regions void; `keep` keeps their category with on-disk id 0, as
  the COCO and Cityscapes converters do (see coco.py).
- Thing instances keep the source's track id as their on-disk id (page 2 of the TIFF), so a track has the same id in
  every frame of its sequence; decoding numbers each class's instances 1..K in increasing track id.
Bad input fails its example with the reason: a semantic id outside 0-18 and 255, an instance id on a class without
instances, a track id >= 1000 (DeepLab2's label divisor), a map that is not RGB, or an image of another size.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib

import numpy as np

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import cityscapes, common

THING_NAMES = ("person", "car")  # DeepLab2's class_has_instances_list=(11, 13).
IGNORE_ID = 255
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
MAP_EXTENSION = ".png"
IMAGES_FOLDER = "images"
MAPS_FOLDER = "panoptic_maps"


def dataset_info() -> fmt.DatasetInfo:
  """Cityscapes' categories and colours, with only person and car as things."""
  cityscapes_info = cityscapes.dataset_info()
  return dataclasses.replace(cityscapes_info,
                             is_thing=tuple(name in THING_NAMES for name in cityscapes_info.categories))


# ----------------------------------------------------------------------------------------------------------------------
# Per example (in workers)


def _listed(values: np.ndarray, counts: np.ndarray) -> str:
  shown = ", ".join(f"{v} ({n} px)" for v, n in zip(values[:5].tolist(), counts[:5].tolist()))
  return shown + (" ..." if len(values) > 5 else "")


def convert_example(example: common.Example, info: fmt.DatasetInfo,
                    crowd: str = "ignore") -> tuple[bytes, np.ndarray, dict[str, int]]:
  """One KITTI-STEP panoptic PNG -> (image bytes, int32 [H, W] canonical map, segment counts)."""
  png = example.annotation_path
  label = common.decode_png(common.read_file(png, "annotation"), png, "annotation")
  if label.ndim != 3 or label.shape[-1] not in (3, 4) or label.dtype != np.uint8:
    raise common.ConversionError(f"annotation {png}: expected an 8-bit RGB PNG (R = semantic id, G * 256 + B = "
                                 f"instance id), found shape {label.shape} {label.dtype}")
  image_bytes = common.read_file(example.image_path, "image")
  common.check_image(image_bytes, example.image_path, label.shape[:2], None)

  semantic = label[..., 0].astype(np.int32)
  instance = label[..., 1].astype(np.int32) * 256 + label[..., 2]
  void = semantic == IGNORE_ID
  unknown = (semantic >= info.num_classes) & ~void
  if unknown.any():
    values, counts = np.unique(semantic[unknown], return_counts=True)
    raise common.ConversionError(f"annotation {png}: semantic ids (R) {_listed(values, counts)} are not train ids; "
                                 f"KITTI-STEP uses 0..{info.num_classes - 1} and {IGNORE_ID} (void)")
  semantic = np.where(void, 0, semantic)  # A valid index below; void pixels are masked out again at the end.
  is_thing = np.asarray(info.is_thing, bool)[semantic] & ~void
  stray = ~is_thing & ~void & (instance != 0)
  if stray.any():
    values, counts = np.unique(semantic[stray], return_counts=True)
    names = ", ".join(f"{info.categories[v]} ({n} px)" for v, n in zip(values.tolist(), counts.tolist()))
    raise common.ConversionError(f"annotation {png}: instance ids on classes without instances: {names}; in "
                                 f"KITTI-STEP only {' and '.join(THING_NAMES)} carry instance ids")
  too_big = is_thing & (instance >= info.label_divisor)
  if too_big.any():
    values, counts = np.unique(instance[too_big], return_counts=True)
    raise common.ConversionError(f"annotation {png}: track ids {_listed(values, counts)} do not fit label_divisor "
                                 f"{info.label_divisor} (KITTI-STEP's ids are < 1000)")

  is_crowd = is_thing & (instance == 0)
  panoptic = semantic * info.label_divisor + np.where(is_thing, instance, 0)
  drop = void | is_crowd if crowd == "ignore" else void
  panoptic = np.where(drop, fmt.VOID, panoptic).astype(np.int32)

  stats: collections.Counter = collections.Counter()
  num_crowd = len(np.unique(semantic[is_crowd])) if is_crowd.any() else 0
  if num_crowd:
    stats[f"crowd {'kept' if crowd == 'keep' else 'to void'}"] += num_crowd
  present = np.flatnonzero(np.bincount(panoptic[panoptic != fmt.VOID].ravel(),
                                       minlength=info.num_classes * info.label_divisor))
  category = present // info.label_divisor
  thing_present = np.asarray(info.is_thing, bool)[category]
  stats["thing instances"] += int((thing_present & (present % info.label_divisor != 0)).sum())
  stats["stuff segments"] += int((~thing_present).sum())
  return image_bytes, panoptic, stats


# ----------------------------------------------------------------------------------------------------------------------
# Finding the files


def _index(folder: pathlib.Path, extensions: tuple[str, ...], what: str) -> dict[tuple[str, str], pathlib.Path]:
  """(sequence, frame) -> file, for the files <folder>/<sequence>/<frame><ext>."""
  found: dict[tuple[str, str], pathlib.Path] = {}
  for path in sorted(folder.glob("*/*")):
    if not path.is_file() or path.suffix.lower() not in extensions:
      continue
    key = (path.parent.name, path.stem)
    if key in found:
      raise ValueError(f"{folder}: two {what} for frame {key[1]} of sequence {key[0]}: {found[key].name} and "
                       f"{path.name}")
    found[key] = path
  return found


def find_examples(root: str, split: str, *, images: str | None = None, panoptic_maps: str | None = None):
  """Finds and pairs images and panoptic maps. Returns (examples, failed, unpaired)."""
  root_path = pathlib.Path(root)
  images_dir = pathlib.Path(images) if images else root_path / IMAGES_FOLDER / split
  maps_dir = pathlib.Path(panoptic_maps) if panoptic_maps else root_path / MAPS_FOLDER / split
  if not images_dir.is_dir():
    raise ValueError(f"images folder {images_dir} does not exist (expected {IMAGES_FOLDER}/<split>/<sequence>/"
                     "<frame>.png under --root, or pass --images)")
  if not maps_dir.is_dir():
    raise ValueError(f"panoptic maps folder {maps_dir} does not exist (expected {MAPS_FOLDER}/<split>/<sequence>/"
                     "<frame>.png under --root from kitti-step.tar.gz, or pass --panoptic_maps; the test split has "
                     "no maps)")
  image_of = _index(images_dir, IMAGE_EXTENSIONS, "images")
  map_of = _index(maps_dir, (MAP_EXTENSION,), "panoptic maps")
  if not image_of and not map_of:
    raise ValueError(f"found no <sequence>/<frame>.png files in {images_dir} nor in {maps_dir}")

  examples, failed = [], []
  for (sequence, frame), path in sorted(map_of.items()):
    if (sequence, frame) not in image_of:
      failed.append((f"{sequence}/{path.name}", f"no image {sequence}/{frame}{{{','.join(IMAGE_EXTENSIONS)}}} "
                     f"under {images_dir}"))
      continue
    examples.append(common.Example(stem=f"{sequence}_{frame}", image_path=str(image_of[sequence, frame]),
                                   annotation_path=str(path)))
  unpaired = [(f"{s}/{p.name}", "image without panoptic map") for (s, f), p in sorted(image_of.items())
              if (s, f) not in map_of]
  return examples, failed, unpaired


def convert(root: str, split: str, out: str, *, images: str | None = None, panoptic_maps: str | None = None,
            crowd: str = "ignore", endpoint_url: str | None = None, workers: int = 1,
            progress: bool = True, label_space: common.LabelSpace | None = None) -> common.Summary:
  """Converts one KITTI-STEP split into the dataset at `out` (a folder or s3://bucket/prefix); see the module doc.

  Args:
    root: the KITTI-STEP root holding images/ and panoptic_maps/.
    split: train or val (a folder under both).
    out: the output location.
    images: the split's images folder (<sequence>/<frame>.png inside), instead of ROOT/images/SPLIT.
    panoptic_maps: the split's maps folder (<sequence>/<frame>.png inside), instead of ROOT/panoptic_maps/SPLIT.
    crowd: `ignore` (crowd regions become void) or `keep` (their category with instance id 0).
    endpoint_url: the S3 endpoint for s3:// outputs.
    workers: worker processes; 0 or 1 converts in this process.
    progress: show a progress bar.

  Returns:
    The run's Summary (failed examples are named with their reason; the others are converted).
  """
  common.check_arguments(crowd, split)
  examples, failed, unpaired = find_examples(root, split, images=images, panoptic_maps=panoptic_maps)
  return common.run_conversion(
      examples, dataset_info(), convert_example, out=out, endpoint_url=endpoint_url, workers=workers,
      options={"crowd": crowd}, failed=failed, unpaired=unpaired, progress=progress,
      label_space=label_space,
      provenance=f"converted from KITTI-STEP {split} with --crowd {crowd}")
