"""Mapillary Vistas panoptic (v1.2 and v2.0) -> the project's dataset format.

  python -m panoptic_jax.data.convert mapillary --root VISTAS --split validation --version v2.0 \
      --out data/vistas/val [--images DIR] [--panoptic_json FILE] [--panoptic_dir DIR] [--config FILE|none] \
      [--crowd ignore|keep] [--endpoint_url URL] [--workers N]

Inputs, under --root (the layout of the research-edition download, mapillary-vistas-dataset_public_v2.0.zip):
  config_v1.2.json, config_v2.0.json                   the label lists: name, readable, color, instances, evaluate
  <split>/images/<key>.jpg                             images (split: training or validation; train / val work too)
  <split>/v1.2/panoptic/panoptic_2018.json + <key>.png  --version v1.2
  <split>/v2.0/panoptic/panoptic_2020.json + <key>.png  --version v2.0
The older v1.1 / v1.2-only download (<split>/panoptic/panoptic_2018.json, config.json at the root) is found too
with --version v1.2. Output names are the image keys: images/<key>.jpg and panoptic_maps/<key>.tif pair up.

Facts relied on, and where they come from:
- Layout and file names: the v2.0 README ("{training,validation,testing}/images", "{training,validation}/
  {v1.2,v2.0}/labels", ... ), with the panoptic folders and JSON names as Datumaro's Mapillary Vistas format page
  gives them (docs/data-formats/formats/mapillary_vistas.md: <split>/v1.2/panoptic/panoptic_2018.json,
  <split>/v2.0/panoptic/panoptic_2020.json, the PNGs beside them, config_v1.2.json / config_v2.0.json at the root).
  The v1.1 README has "{training,validation}/panoptic" (24-bit RGB); Mask2Former's register_mapillary_vistas_
  panoptic.py reads <split>/panoptic/panoptic_2018.json there.
- The panoptic JSON is COCO panoptic: images {id, file_name, height, width}, annotations {image_id, file_name,
  segments_info [{id, category_id, iscrowd, area, bbox}]}, categories {id, name, supercategory, isthing, color};
  PNG id = R + 256 G + 256^2 B, id 0 = unlabeled. It is read by the COCO converter's own code (coco.find_examples,
  coco.convert_example), so areas, listed ids and image sizes are checked as there (see coco.py).
- Categories: v1.2's panoptic_2018.json lists 65, `name` being the config's `readable` and `supercategory` its
  hierarchical `name` (e.g. "Bird" / "animal--bird"; the list as Mask2Former copied it): 37 things and 28 stuff, Car
  Mount and Ego Vehicle being stuff. The 66th label, Unlabeled (the only one with evaluate = false in v1.2), is not
  listed: its pixels are id 0. This is the label set of the joint COCO + Mapillary panoptic challenges (ECCV 2018,
  ICCV 2019: "66 object categories (28 stuff classes, 37 thing classes, 1 void class)", research.mapillary.com/
  eccv18), scored with panopticapi, which ignores unlabeled pixels. v2.0 has 124 labels (70 instance-specific, 46
  stuff, 8 void or crowd: mmsegmentation's mapillary.py) and colours shared by several labels (e.g. every traffic
  light is [250, 170, 30]; Datumaro's format.py lists them).
- Void: a category whose config label has `evaluate: false` becomes void, as Cityscapes' ignoreInEval labels do
  (github.com/mapillary/mapillary_vistas, evaluation/confusion_matrix.py, drops those labels' rows and columns before
  scoring); the rest keep the JSON's order, names, isthing and colours. Config labels are matched to JSON categories
  by hierarchical name (the category's `name` or `supercategory`), else by a unique `readable`; a JSON category the
  config does not describe stops the run (wrong --version or --config). `--config none` keeps every JSON category.
  Not verified here: which v2.0 labels have evaluate = false (no config_v2.0.json was at hand); the rule reads them
  from the file given, and the run logs the categories it makes void.
- Colours: the JSON's, made unique and non-black by common.resolve_colors (a later category whose colour is taken
  moves to the nearest free one, logged), since the format needs one colour per category.
- Crowd (`--crowd`), instance numbering, stuff merging: as in coco.py. An image with more than
  label_divisor - 1 (999) thing instances fails with the reason.
- Images differ in size from one to the next; each map is written at its image's size. An image whose size differs
  from its PNG's, or from the JSON's height / width, fails with the reason (that example only).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
from typing import Any

from absl import logging

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import coco, common

PANOPTIC_JSON = {"v1.2": "panoptic_2018.json", "v2.0": "panoptic_2020.json"}
VERSIONS = tuple(PANOPTIC_JSON)
SPLIT_FOLDERS = {"train": "training", "val": "validation"}
NO_CONFIG = "none"


def _read_json(path: pathlib.Path, what: str) -> Any:
  try:
    return json.loads(path.read_bytes())
  except OSError as e:
    raise ValueError(f"{what} {path}: cannot read: {e.strerror or e}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} {path}: not valid JSON: {e}") from None


def read_config(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """A Vistas config_*.json -> its `labels` (each with a string `name`; `readable`, `color`, `evaluate` optional)."""
  path = pathlib.Path(path)
  data = _read_json(path, "config")
  labels = data.get("labels") if isinstance(data, dict) else None
  if not isinstance(labels, list) or not labels:
    raise ValueError(f"config {path}: expected an object with a non-empty `labels` list (a Mapillary Vistas "
                     "config_*.json)")
  for i, label in enumerate(labels):
    if not isinstance(label, dict) or not isinstance(label.get("name"), str):
      raise ValueError(f"config {path}: labels[{i}]: expected an object with a string `name`, found {label!r:.200}")
  return labels


def dataset_info(categories: list[dict[str, Any]], labels: list[dict[str, Any]] | None, where: str = "panoptic JSON"
                 ) -> tuple[fmt.DatasetInfo, dict[int, int], list[str]]:
  """The panoptic JSON's categories and the config's labels -> (info, {category_id: index or VOID}, void names).

  Categories whose config label has `evaluate: false` map to VOID and are left out of `info`; the others keep the
  JSON's order. `labels=None` keeps every category.

  Raises:
    ValueError: for a malformed category list, or a category the config does not describe.
  """
  if not isinstance(categories, list) or not categories:
    raise ValueError(f"{where}: expected a non-empty `categories` list, found {categories!r:.200}")
  kept, void_ids, void_names = [], [], []
  if labels is not None:
    by_name = {label["name"]: label for label in labels}
    readables = [label.get("readable") for label in labels]
    by_readable = {r: label for r, label in zip(readables, labels) if r is not None and readables.count(r) == 1}
  for i, category in enumerate(categories):
    if not isinstance(category, dict) or "id" not in category:
      raise ValueError(f"{where}: categories[{i}]: expected an object with an `id`, found {category!r:.200}")
    if labels is None:
      kept.append(category)
      continue
    name, parent = category.get("name"), category.get("supercategory")
    label = by_name.get(name) or by_name.get(parent) or by_readable.get(name)
    if label is None:
      raise ValueError(f"{where}: category {category['id']} ({name!r}, supercategory {parent!r}) is not among the "
                       "config's labels; is --version or --config another release's? (--config none keeps the "
                       "JSON's categories as they are)")
    if not label.get("evaluate", True):
      void_ids.append(category["id"])
      void_names.append(str(name))
      continue
    kept.append({**category,
                 "color": category.get("color", label.get("color")),
                 "isthing": category.get("isthing", int(bool(label.get("instances"))))})
  if not kept:
    raise ValueError(f"{where}: every category is void (evaluate = false in the config)")
  info, index = coco.load_categories(kept, where)
  for cid in void_ids:
    index[int(cid)] = fmt.VOID
  return info, index, void_names


def _default_paths(root: pathlib.Path, split: str, version: str) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
  """(split folder, panoptic JSON, config) of the standard layout; the v1.x layout for v1.2 when only it exists."""
  split_dir = root / split
  if not split_dir.is_dir() and split in SPLIT_FOLDERS:
    split_dir = root / SPLIT_FOLDERS[split]
  json_path = split_dir / version / "panoptic" / PANOPTIC_JSON[version]
  config = root / f"config_{version}.json"
  if version == "v1.2":
    legacy = split_dir / "panoptic" / PANOPTIC_JSON[version]
    if not json_path.is_file() and legacy.is_file():
      json_path = legacy
    if not config.is_file() and (root / "config.json").is_file():
      config = root / "config.json"
  return split_dir, json_path, config


@contextlib.contextmanager
def _palette_logs_off():
  """coco.find_examples resolves the colours of every JSON category, void ones included, and logs each change; that
  palette is discarded (dataset_info's is the dataset's), so its log lines would only mislead."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def find_examples(root: str, split: str, *, version: str = "v2.0", images: str | None = None,
                  panoptic_json: str | None = None, panoptic_dir: str | None = None, config: str | None = None):
  """Finds the split's files and pairs images with annotations.

  Returns:
    (info, category index, examples, failed, unpaired, sources): `sources` names the JSON and config used.
  """
  if version not in VERSIONS:
    raise ValueError(f"version: expected one of {VERSIONS}, found {version!r}")
  split_dir, default_json, default_config = _default_paths(pathlib.Path(root), split, version)
  images_dir = pathlib.Path(images) if images else split_dir / "images"
  json_path = pathlib.Path(panoptic_json) if panoptic_json else default_json
  png_dir = pathlib.Path(panoptic_dir) if panoptic_dir else json_path.parent
  if not images_dir.is_dir():
    raise ValueError(f"images folder {images_dir} does not exist (expected <root>/<split>/images, or pass --images)")
  if not json_path.is_file():
    raise ValueError(f"panoptic JSON {json_path} does not exist (expected <root>/<split>/{version}/panoptic/"
                     f"{PANOPTIC_JSON[version]}, or pass --panoptic_json)")
  if not png_dir.is_dir():
    raise ValueError(f"panoptic PNG folder {png_dir} does not exist (pass --panoptic_dir)")

  if config == NO_CONFIG:
    labels, config_path = None, None
  else:
    config_path = pathlib.Path(config) if config else default_config
    if not config_path.is_file():
      raise ValueError(f"config {config_path} does not exist: it says which labels are void (evaluate = false). "
                       f"Pass --config FILE, or --config {NO_CONFIG} to keep every category of the panoptic JSON")
    labels = read_config(config_path)

  data = _read_json(json_path, "panoptic JSON")
  if not isinstance(data, dict) or "categories" not in data:
    raise ValueError(f"panoptic JSON {json_path}: expected a COCO panoptic JSON with images, annotations and "
                     "categories")
  info, index, void = dataset_info(data["categories"], labels, str(json_path))
  del data  # coco.find_examples reads it again: only its categories were needed here.
  if void:
    logging.info("void (evaluate = false in %s): %s", config_path, ", ".join(void))
  with _palette_logs_off():
    _, _, examples, failed, unpaired = coco.find_examples(str(images_dir), str(json_path), str(png_dir))
  sources = f"{json_path.name}, config {config_path.name if config_path else NO_CONFIG}"
  return info, index, examples, failed, unpaired, sources


def convert(root: str, split: str, out: str, *, version: str = "v2.0", images: str | None = None,
            panoptic_json: str | None = None, panoptic_dir: str | None = None, config: str | None = None,
            crowd: str = "ignore", endpoint_url: str | None = None, workers: int = 1,
            progress: bool = True, label_space: common.LabelSpace | None = None) -> common.Summary:
  """Converts one Mapillary Vistas split into the dataset at `out` (a folder or s3://bucket/prefix).

  Args:
    root: the dataset root (holding config_<version>.json and <split>/).
    split: training or validation (train / val are accepted for them).
    out: the output location.
    version: v1.2 or v2.0, the annotation release to convert.
    images: the images folder (default <root>/<split>/images).
    panoptic_json: the panoptic JSON (default <root>/<split>/<version>/panoptic/panoptic_2018|2020.json).
    panoptic_dir: the folder of its PNGs (default: the JSON's folder).
    config: the config JSON (default <root>/config_<version>.json), or "none" to keep every JSON category.
    crowd: "ignore" (crowd regions are void) or "keep" (see coco.py).
    endpoint_url: the S3 endpoint for s3:// outputs.
    workers: worker processes; 1 converts in this process.
    progress: show a progress bar.

  Returns:
    The run's Summary: converted, skipped (already done), failed (with reasons) and unpaired examples.

  Raises:
    ValueError: for unusable inputs as a whole (missing folders or files, malformed JSON, a config that does not
      describe the JSON's categories) or an output holding another dataset.
  """
  common.check_arguments(crowd)
  if not re.fullmatch(r"[\w.-]+", split):
    raise ValueError(f"split: expected a folder name such as training or validation, found {split!r}")
  info, index, examples, failed, unpaired, sources = find_examples(
      root, split, version=version, images=images, panoptic_json=panoptic_json, panoptic_dir=panoptic_dir,
      config=config)
  return common.run_conversion(
      examples, info, coco.convert_example, out=out, endpoint_url=endpoint_url, workers=workers,
      options={"category_index": index, "crowd": crowd}, failed=failed, unpaired=unpaired, progress=progress,
      label_space=label_space,
      provenance=f"converted from Mapillary Vistas {version} {split} ({sources}) with --crowd {crowd}")
