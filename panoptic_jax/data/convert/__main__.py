r"""Converts COCO panoptic or Cityscapes into the project's dataset format (a local folder or s3://bucket/prefix).

  python -m panoptic_jax.data.convert coco --images DIR --panoptic_json FILE --panoptic_dir DIR --out LOCATION \
      [--crowd ignore|keep] [--endpoint_url URL] [--workers N]
  python -m panoptic_jax.data.convert cityscapes --root DIR --split train|val --out LOCATION \
      [--layout auto|instance_ids|panoptic] [--images DIR] [--panoptic_json FILE] [--panoptic_dir DIR] \
      [--crowd ignore|keep] [--endpoint_url URL] [--workers N]

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
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  # Imported here so that --help answers at once.
  from panoptic_jax.data.convert import cityscapes, coco, common  # pylint: disable=g-import-not-at-top
  try:
    if args.dataset == "coco":
      summary = coco.convert(args.images, args.panoptic_json, args.panoptic_dir, args.out, crowd=args.crowd,
                             endpoint_url=args.endpoint_url, workers=args.workers, progress=not args.no_progress)
    else:
      summary = cityscapes.convert(args.root, args.split, args.out, layout=args.layout, images=args.images,
                                   panoptic_json=args.panoptic_json, panoptic_dir=args.panoptic_dir,
                                   crowd=args.crowd, endpoint_url=args.endpoint_url, workers=args.workers,
                                   progress=not args.no_progress)
  except (ValueError, OSError) as e:  # Unusable inputs or output as a whole (not one example): say what and stop.
    print(f"error: {e}", file=sys.stderr)
    return 2
  return common.finish(summary)


if __name__ == "__main__":
  cli.run(main)
