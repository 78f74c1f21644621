r"""Converts COCO panoptic, Cityscapes, Mapillary Vistas, KITTI-STEP or BDD100K panoptic into the project's dataset
format (a local folder or s3://bucket/prefix).

  python -m panoptic_jax.data.convert coco --images DIR --panoptic_json FILE --panoptic_dir DIR --out LOCATION \
      [--crowd ignore|keep] [--endpoint_url URL] [--workers N]
  python -m panoptic_jax.data.convert cityscapes --root DIR --split train|val --out LOCATION \
      [--layout auto|instance_ids|panoptic] [--images DIR] [--panoptic_json FILE] [--panoptic_dir DIR] \
      [--crowd ignore|keep] [--endpoint_url URL] [--workers N]
  python -m panoptic_jax.data.convert mapillary --root DIR --split training|validation --out LOCATION \
      [--version v1.2|v2.0] [--images DIR] [--panoptic_json FILE] [--panoptic_dir DIR] [--config FILE|none] \
      [--crowd ignore|keep] [--endpoint_url URL] [--workers N]
  python -m panoptic_jax.data.convert kitti_step --root DIR --split train|val --out LOCATION \
      [--images DIR] [--panoptic_maps DIR] [--crowd ignore|keep] [--endpoint_url URL] [--workers N]
  python -m panoptic_jax.data.convert bdd100k --root DIR --split train|val --out LOCATION \
      [--images DIR] [--bitmasks DIR] [--crowd ignore|keep] [--endpoint_url URL] [--workers N]

Resumable: an example whose annotation already exists at LOCATION is skipped, so re-running after an interruption
converts only the rest. metadata.yaml is written last. Prints converted / skipped / failed counts with the reason
of each failure; exits with status 1 if any example failed (the others are still converted), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

from panoptic_jax import cli

from absl import logging


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.data.convert",
                                   description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="dataset", required=True)

  def common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output location: a folder or s3://bucket/prefix")
    p.add_argument("--endpoint_url", default=None,
                   help="S3 endpoint for s3:// outputs (default: AWS_ENDPOINT_URL_S3 / the AWS configuration)")
    p.add_argument("--crowd", choices=("ignore", "keep"), default="ignore",
                   help="crowd regions: void (default) or kept as one segment of their class with instance id 0")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="worker processes (1: convert in this process)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument("--class_map", default=None,
                   help="write the dataset in another label space: a YAML file 'source name: target name' (many to "
                   "one allowed; null or unlisted: void); needs --label_space")
    p.add_argument("--label_space", default=None,
                   help="the target label space of --class_map: 'cityscapes' (its 19 classes) or a dataset location "
                   "whose metadata.yaml gives the categories, things and colours")

  coco = sub.add_parser("coco", help="COCO panoptic (panopticapi PNG + JSON)")
  coco.add_argument("--images", required=True, help="folder of the split's images (e.g. COCO/val2017)")
  coco.add_argument("--panoptic_json", required=True, help="e.g. COCO/annotations/panoptic_val2017.json")
  coco.add_argument("--panoptic_dir", required=True, help="folder of its PNGs (e.g. COCO/annotations/panoptic_val2017)")
  common_flags(coco)

  city = sub.add_parser("cityscapes", help="Cityscapes gtFine (instanceIds or createPanopticImgs output)")
  city.add_argument("--root", required=True, help="the Cityscapes root with leftImg8bit/ and gtFine/")
  city.add_argument("--split", required=True, help="train, val, ... (a folder under leftImg8bit/ and gtFine/)")
  city.add_argument("--layout", choices=("auto", "instance_ids", "panoptic"), default="auto")
  city.add_argument("--images", default=None, help="images folder (default ROOT/leftImg8bit/SPLIT), searched "
                    "recursively for *_leftImg8bit.png")
  city.add_argument("--panoptic_json", default=None,
                    help="default ROOT/gtFine/cityscapes_panoptic_SPLIT[_trainId].json")
  city.add_argument("--panoptic_dir", default=None, help="default: the JSON's path without .json")
  common_flags(city)

  step = sub.add_parser("kitti_step", help="KITTI-STEP (DeepLab2 layout: panoptic PNGs, R = train id, "
                        "G * 256 + B = track id)")
  step.add_argument("--root", required=True, help="the KITTI-STEP root with images/ and panoptic_maps/")
  step.add_argument("--split", required=True, help="train or val (a folder under images/ and panoptic_maps/)")
  step.add_argument("--images", default=None,
                    help="images folder holding <sequence>/<frame>.png (default ROOT/images/SPLIT)")
  step.add_argument("--panoptic_maps", default=None,
                    help="panoptic maps folder holding <sequence>/<frame>.png (default ROOT/panoptic_maps/SPLIT)")
  common_flags(step)

  bdd = sub.add_parser("bdd100k", help="BDD100K panoptic segmentation (pan_seg RGBA bitmasks); --crowd also covers "
                       "segments flagged ignore")
  bdd.add_argument("--root", required=True, help="the BDD100K root with images/10k/ and labels/pan_seg/ "
                   "(the bdd100k folder of the downloads)")
  bdd.add_argument("--split", required=True, help="train or val (a folder under images/10k/ and "
                   "labels/pan_seg/bitmasks/)")
  bdd.add_argument("--images", default=None, help="images folder (default ROOT/images/10k/SPLIT)")
  bdd.add_argument("--bitmasks", default=None, help="bitmask folder (default ROOT/labels/pan_seg/bitmasks/SPLIT)")
  common_flags(bdd)

  vistas = sub.add_parser("mapillary", help="Mapillary Vistas panoptic (v1.2 or v2.0 PNG + JSON)")
  vistas.add_argument("--root", required=True, help="the Vistas root with config_VERSION.json and SPLIT/")
  vistas.add_argument("--split", required=True, help="training or validation (train / val work too)")
  vistas.add_argument("--version", choices=("v1.2", "v2.0"), default="v2.0", help="annotation release (default v2.0)")
  vistas.add_argument("--images", default=None, help="images folder (default ROOT/SPLIT/images)")
  vistas.add_argument("--panoptic_json", default=None, help="default ROOT/SPLIT/VERSION/panoptic/panoptic_2018.json "
                      "(v1.2) or panoptic_2020.json (v2.0)")
  vistas.add_argument("--panoptic_dir", default=None, help="folder of its PNGs (default: the JSON's folder)")
  vistas.add_argument("--config", default=None, help="the label list; labels with evaluate=false become void "
                      "(default ROOT/config_VERSION.json; 'none' keeps every category of the panoptic JSON)")
  common_flags(vistas)
  return parser


def _label_space(args: argparse.Namespace):
  """The --class_map / --label_space pair as a common.LabelSpace, or None."""
  if (args.class_map is None) != (args.label_space is None):
    raise ValueError("--class_map and --label_space go together: the class map names the label space's categories")
  if args.class_map is None:
    return None
  from panoptic_jax.data import dataset_format as fmt  # pylint: disable=g-import-not-at-top
  from panoptic_jax.data.class_map import ClassMap  # pylint: disable=g-import-not-at-top
  from panoptic_jax.data.convert import cityscapes, common  # pylint: disable=g-import-not-at-top
  from panoptic_jax.data.storage import open_storage  # pylint: disable=g-import-not-at-top
  if args.label_space == "cityscapes":
    target = cityscapes.dataset_info()
  else:
    text = open_storage(args.label_space, args.endpoint_url).read_bytes("metadata.yaml").decode()
    target = fmt.parse_metadata(text, f"{args.label_space}/metadata.yaml")
  return common.LabelSpace(target, ClassMap.read(args.class_map, args.endpoint_url))


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  # Imported here so that --help answers at once.
  from panoptic_jax.data.convert import (  # pylint: disable=g-import-not-at-top
      bdd100k, cityscapes, coco, common, kitti_step, mapillary)
  try:
    run = dict(crowd=args.crowd, endpoint_url=args.endpoint_url, workers=args.workers, progress=not args.no_progress,
               label_space=_label_space(args))
    if args.dataset == "coco":
      summary = coco.convert(args.images, args.panoptic_json, args.panoptic_dir, args.out, **run)
    elif args.dataset == "cityscapes":
      summary = cityscapes.convert(args.root, args.split, args.out, layout=args.layout, images=args.images,
                                   panoptic_json=args.panoptic_json, panoptic_dir=args.panoptic_dir, **run)
    elif args.dataset == "mapillary":
      summary = mapillary.convert(args.root, args.split, args.out, version=args.version, images=args.images,
                                  panoptic_json=args.panoptic_json, panoptic_dir=args.panoptic_dir,
                                  config=args.config, **run)
    elif args.dataset == "kitti_step":
      summary = kitti_step.convert(args.root, args.split, args.out, images=args.images,
                                   panoptic_maps=args.panoptic_maps, **run)
    else:
      summary = bdd100k.convert(args.root, args.split, args.out, images=args.images, bitmasks=args.bitmasks, **run)
  except (ValueError, OSError) as e:  # Unusable inputs or output as a whole (not one example): say what and stop.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return common.finish(summary)


if __name__ == "__main__":
  cli.run(main)
