"""Evaluates panoptic predictions against ground truth: PQ / SQ / RQ (panopticapi semantics), mIoU and AP^Th_pan.

Each side is a dataset in the project's format (a folder or s3://bucket/prefix) or COCO panoptic format (JSON + PNG
folder), in any combination:

  python -m panoptic_jax.evaluate --gt DATASET --pred PREDICTIONS [--out results.json] [--endpoint_url URL]
  python -m panoptic_jax.evaluate --gt_json panoptic_val2017.json --gt_folder panoptic_val2017 \\
      --pred_json predictions.json --pred_folder predictions/ [--out results.json]

Categories are the GT's (COCO: the GT JSON's `categories` list, in order, with `isthing`). COCO vs COCO matches
categories by id and images by image_id (as panopticapi); any other combination matches both by name (image name =
file stem). AP needs a score for every predicted thing segment: a `score` field in COCO `segments_info`, or in the
project's format a segment list `segments/<stem>.json` per image (README, "The dataset format"); otherwise the output
says that AP was not computed.

A GT whose metadata.yaml says `task: semantic segmentation` (an external set with semantic labels only) is scored
semantically: per-class IoU, mIoU, pixel accuracy and the confusion matrix, the categories matched by name or through
`--class_map FILE.yaml` (their name: our name), optionally with pictures (`panoptic_jax/evaluation/
semantic_external.py`):

  python -m panoptic_jax.evaluate --gt EXTERNAL --pred PREDICTIONS [--class_map FILE.yaml] [--out results.json] \
      [--pictures DIR] [--max_pictures 20]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from panoptic_jax import cli, host_memory
from panoptic_jax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.evaluate", description=__doc__.split("\n\n")[0])
  parser.add_argument("--gt", help="GT dataset location (folder or s3://bucket/prefix) in the project's format")
  parser.add_argument("--gt_json", help="GT in COCO panoptic format: the JSON file")
  parser.add_argument("--gt_folder", help="GT PNG folder (default: the JSON path without .json)")
  parser.add_argument("--pred", help="predictions: a location in the project's format")
  parser.add_argument("--pred_json", help="predictions in COCO panoptic format: the JSON file")
  parser.add_argument("--pred_folder", help="prediction PNG folder (default: the JSON path without .json)")
  parser.add_argument("--out", help="write the results as JSON to this file")
  parser.add_argument("--endpoint_url", help="S3 endpoint for s3:// locations")
  parser.add_argument("--batch_size", type=int, default=16, help="images per jitted call (default 16)")
  parser.add_argument("--max_segments", type=int, default=128,
                      help="initial segments per image of the jitted metric; grows automatically (default 128)")
  parser.add_argument("--workers", type=int, default=4,
                      help="file readers: threads, or for COCO against COCO worker processes, at most one per core "
                      "(default 4)")
  semantic = parser.add_argument_group("semantic-only GT (metadata.yaml task: semantic segmentation)")
  semantic.add_argument("--class_map", help="YAML file (or s3://) 'GT category name: predicted category name'; "
                        "many-to-one allowed, null or unlisted = void (default: match categories by name)")
  semantic.add_argument("--pictures", metavar="DIR", help="write image | label | prediction pictures and a "
                        "confusion-matrix picture into DIR (folder or s3://)")
  semantic.add_argument("--max_pictures", type=int, default=20,
                        help="comparison pictures for the first N images (default 20)")
  return parser


def _gt_task(args) -> str | None:
  """The task in --gt's metadata.yaml (None for a COCO GT)."""
  if args.gt is None:
    return None
  from panoptic_jax.data.dataset import read_metadata
  from panoptic_jax.data.storage import open_storage
  return read_metadata(open_storage(args.gt, args.endpoint_url)).task


def _semantic(parser, args) -> int:
  """The semantic-only evaluation of a semantic-segmentation GT."""
  if args.pred is None or args.pred_json is not None or args.gt_json is not None:
    parser.error("a semantic-segmentation GT (--gt) is scored against --pred, predictions in the project's format")
  if args.max_pictures < 0:
    parser.error(f"--max_pictures: expected a number >= 0, found {args.max_pictures}")
  from panoptic_jax.evaluation import semantic_external
  result = semantic_external.evaluate_external(args.gt, args.pred, args.class_map, args.endpoint_url,
                                               pictures=args.pictures, max_pictures=args.max_pictures,
                                               num_workers=args.workers)
  print(semantic_external.format_report(result))
  _write_json(result, args.out)
  return 0


def _write_json(result: dict, path: str | None) -> None:
  if path:
    from panoptic_jax.data.storage import open_file
    folder, name = open_file(path)
    folder.write_bytes(name, json.dumps(result, indent=1).encode())
    print(f"wrote {path}")


def _one_device_per_core() -> None:
  """On a CPU-only host, one JAX CPU device per core: the metric splits each batch of images over the devices
  (XLA:CPU would run one image's work on one core). Before JAX is imported; a device count given in XLA_FLAGS
  stands."""
  flags = os.environ.get("XLA_FLAGS", "")
  if host_memory.cpu_only(dict(os.environ)) and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={os.cpu_count() or 1}".strip()


def _side(parser, args, which: str, reference=None):
  from panoptic_jax.evaluation import evaluator as evaluator_lib
  location, json_path, folder = getattr(args, which), getattr(args, f"{which}_json"), getattr(args, f"{which}_folder")
  if (location is None) == (json_path is None):
    parser.error(f"give exactly one of --{which} (project format) or --{which}_json (COCO panoptic format)")
  if location is not None:
    if folder is not None:
      parser.error(f"--{which}_folder goes with --{which}_json, not --{which}")
    return evaluator_lib.open_dataset_side(location, args.endpoint_url)
  return evaluator_lib.open_coco_side(json_path, folder, reference)


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  from panoptic_jax.data.dataset_format import SEMANTIC_TASK  # No JAX.
  try:
    task = _gt_task(args)
    if task == SEMANTIC_TASK:
      return _semantic(parser, args)
  except (UserError, ValueError, OSError) as e:
    print(f"error: {cli.describe(e)}", file=sys.stderr)
    return 2
  for flag in ("class_map", "pictures"):
    if getattr(args, flag) is not None:
      parser.error(f"--{flag} applies to a GT with 'task: {SEMANTIC_TASK}' in its metadata.yaml; this GT is "
                   f"{'a COCO panoptic JSON' if task is None else repr(task)}")
  from panoptic_jax.evaluation import evaluator as evaluator_lib
  from panoptic_jax.evaluation.coco_format import CocoFormatError
  if _label_maps(args):  # Through the jitted metric (COCO against COCO: on the host, without JAX).
    _one_device_per_core()
    cli.initialise_jax()  # The persistent compilation cache: later runs skip compiling the metric.
  try:
    gt = _side(parser, args, "gt")
    pred = _side(parser, args, "pred", reference=gt.coco if args.pred_json and args.gt_json else None)
    result = evaluator_lib.evaluate_sides(gt, pred, batch_size=args.batch_size, max_segments=args.max_segments,
                                          num_workers=args.workers)
  except (evaluator_lib.EvaluationError, CocoFormatError, ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  result["gt"] = gt.describe
  result["pred"] = pred.describe
  print(evaluator_lib.format_table(result))
  _write_json(result, args.out)
  return 0


def _label_maps(args: argparse.Namespace) -> bool:
  """Whether a side is in the project's format, hence evaluated as label maps by the jitted metric."""
  return args.gt_json is None or args.pred_json is None


if __name__ == "__main__":
  # The jitted metric's large temporaries stay mapped (panoptic_jax/host_memory.py; a relaunch of the process): only
  # for label maps, since COCO against COCO is counted on the host.
  cli.run(main, malloc_tunables=_label_maps(_parser().parse_known_args()[0]))
