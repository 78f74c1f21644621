"""COCO panoptic (panopticapi PNG + JSON) -> the project's dataset format.

  python -m panoptic_jax.data.convert coco --images COCO/val2017 \
      --panoptic_json COCO/annotations/panoptic_val2017.json --panoptic_dir COCO/annotations/panoptic_val2017 \
      --out data/coco/val [--crowd ignore|keep] [--endpoint_url URL] [--workers N]

Conventions (those of DeepLab2's build_coco_data.py, docs/metrics.md):
- Categories: the JSON's `categories` list, in its order, become contiguous indices 0..C-1 (COCO: 133, the 80
  things first). metadata.yaml lists them with their names, `things` (isthing = 1) and their colours; colours are
  made unique and non-black (a later category that collides moves to the nearest free colour, logged), and a
  category without a colour gets a generated one.
- Segments: PNG id = R + 256 G + 256^2 B, listed in `segments_info` (id, category_id, iscrowd, area). Each listed
  segment's pixel count must equal its `area`, every non-zero id in the PNG must be listed, ids must be unique: an
  image that breaks this fails with the reason. Id 0 and unlisted pixels are void.
- Things: the on-disk instance ids are 1..K in `segments_info` order, unique in the image; decoding renumbers them
  1..n per category in that order, DeepLab2's numbering. Stuff has id 0 (several segments of a stuff class merge).
- Crowd (`--crowd`):
  * `ignore` (default, DeepLab2's treat_crowd_as_ignore): crowd pixels are void.
  * `keep`: crowd pixels keep their category with on-disk id 0, which no real instance uses. All crowd regions of a
    class in an image form one segment. The format has no crowd flag, so readers see that segment as one more
    instance of the class (DeepLab2 keeps "category, instance 0"; decoding gives it the lowest instance number).
  Either way, the converted map scored as a prediction against the original GT gives PQ = 1 (panopticapi): void
  prediction pixels are not segments, and a kept crowd segment is an unmatched prediction lying over a crowd region
  of its own category, which panopticapi does not count as a false positive.
- Images are copied byte for byte to images/<stem><ext>; annotations go to panoptic_maps/<stem>.tif.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import common



def load_categories(categories: list[dict[str, Any]], where: str) -> tuple[fmt.DatasetInfo, dict[int, int]]:
  """The JSON's categories -> (DatasetInfo, {COCO category id: contiguous index})."""
  if not isinstance(categories, list) or not categories:
    raise ValueError(f"{where}: expected a non-empty `categories` list, found {categories!r:.200}")
  names, colors, things, index = [], [], [], {}
  for i, category in enumerate(categories):
    if not isinstance(category, dict) or "id" not in category:
      raise ValueError(f"{where}: categories[{i}]: expected an object with an `id`, found {category!r:.200}")
    cid = int(category["id"])
    if cid in index:
      raise ValueError(f"{where}: categories: id {cid} is listed twice")
    index[cid] = i
    names.append(str(category.get("name", f"category_{cid}")))
    color = category.get("color")
    if color is not None and (not isinstance(color, list) or len(color) != 3
                              or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
      raise ValueError(f"{where}: categories[{i}] ({names[-1]!r}): color: expected [r, g, b] with integers 0-255, "
                       f"found {color!r}")
    colors.append(tuple(color) if color is not None else None)
    things.append(bool(category.get("isthing", 1)))
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"{where}: categories: names must be unique, found duplicates {duplicates}")
  info = fmt.DatasetInfo(categories=tuple(names), colors=common.resolve_colors(names, colors), is_thing=tuple(things))
  return info, index


def find_examples(images_dir: str, panoptic_json: str, panoptic_dir: str
                  ) -> tuple[fmt.DatasetInfo, dict[int, int], list[common.Example], list, list]:
  """Reads the panoptic JSON. Returns (info, category index, examples, failed, unpaired)."""
  try:
    with open(panoptic_json, "rb") as f:
      data = json.load(f)
  except OSError as e:
    raise ValueError(f"{panoptic_json}: cannot read: {e.strerror or e}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{panoptic_json}: not valid JSON: {e}") from None
  if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= data.keys():
    raise ValueError(f"{panoptic_json}: expected a COCO panoptic JSON with images, annotations and categories; "
                     f"found keys {sorted(data) if isinstance(data, dict) else type(data).__name__}")
  info, index = load_categories(data["categories"], panoptic_json)

  images, failed = {}, []
  for i, image in enumerate(data["images"]):
    if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
      failed.append((f"images[{i}]", f"expected an object with id and file_name, found {image!r:.200}"))
      continue
    images[image["id"]] = image
  examples, annotated = [], set()
  for i, annotation in enumerate(data["annotations"]):
    if not isinstance(annotation, dict) or "file_name" not in annotation or "image_id" not in annotation:
      failed.append((f"annotations[{i}]", f"expected an object with image_id and file_name, found {annotation!r:.200}"))
      continue
    name = str(annotation["file_name"])
    image = images.get(annotation["image_id"])
    if image is None:
      failed.append((name, f"annotation for image_id {annotation['image_id']!r}, which `images` does not list"))
      continue
    annotated.add(image["id"])
    image_name = str(image["file_name"])
    if pathlib.PurePath(image_name).suffix.lower() not in fmt.IMAGE_EXTENSIONS:
      failed.append((image_name, f"image extension not one of {fmt.IMAGE_EXTENSIONS}"))
      continue
    segments = annotation.get("segments_info", [])
    if not isinstance(segments, list) or not all(isinstance(x, dict) for x in segments):
      failed.append((name, f"segments_info: expected a list of objects, found {segments!r:.200}"))
      continue
    segments = tuple({k: x.get(k) for k in ("id", "category_id", "iscrowd", "area")} for x in segments)
    hw = (int(image["height"]), int(image["width"])) if "height" in image and "width" in image else None
    examples.append(common.Example(stem=pathlib.PurePath(image_name).stem,
                                   image_path=str(pathlib.Path(images_dir) / image_name),
                                   annotation_path=str(pathlib.Path(panoptic_dir) / name),
                                   segments=segments, expected_hw=hw))
  unpaired = [(str(image["file_name"]), "listed in `images` but has no annotation")
              for image_id, image in images.items() if image_id not in annotated]
  return info, index, examples, failed, unpaired


def convert_example(example: common.Example, info: fmt.DatasetInfo, category_index: dict[int, int],
                    crowd: str = "ignore") -> tuple[bytes, np.ndarray, dict[str, int]]:
  """One COCO panoptic example -> (image bytes, int32 [H, W] canonical map, segment counts).

  Raises:
    common.ConversionError: naming the file, for unreadable or undecodable files, sizes that differ, unknown
      categories, duplicate or unlisted segment ids, or a segment whose pixel count differs from its listed area.
  """
  png = example.annotation_path
  ids = common.rgb_ids(common.decode_png(common.read_file(png, "annotation"), png, "annotation"), png, "annotation")
  image_bytes = common.read_file(example.image_path, "image")
  common.check_image(image_bytes, example.image_path, ids.shape, example.expected_hw)

  panoptic, stats = common.panoptic_from_segments(ids, example.segments or (), category_index, info, crowd, png)
  return image_bytes, panoptic, stats


def convert(images: str, panoptic_json: str, panoptic_dir: str, out: str, *, crowd: str = "ignore",
            endpoint_url: str | None = None, workers: int = 1, progress: bool = True,
            label_space: common.LabelSpace | None = None) -> common.Summary:
  """Converts a COCO panoptic split into the dataset at `out` (a folder or s3://bucket/prefix); see the module doc."""
  common.check_arguments(crowd)
  for path, what in ((images, "--images"), (panoptic_dir, "--panoptic_dir")):
    if not pathlib.Path(path).is_dir():
      raise ValueError(f"{what} {path}: not a folder")
  info, index, examples, failed, unpaired = find_examples(images, panoptic_json, panoptic_dir)
  return common.run_conversion(
      examples, info, convert_example, out=out, endpoint_url=endpoint_url, workers=workers,
      options={"category_index": index, "crowd": crowd}, failed=failed, unpaired=unpaired, progress=progress,
      label_space=label_space,
      provenance=f"converted from COCO panoptic {pathlib.Path(panoptic_json).name} with --crowd {crowd}")
