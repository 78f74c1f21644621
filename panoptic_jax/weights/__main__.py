"""`python -m panoptic_jax.weights inspect FILE --preset NAME`: what a weights file holds and how it maps onto a
model preset (which of our variables each tensor fills, the parameters covered, what is left over), computed on the
abstract model (nothing is materialised). Exits 2 when the file does not fit the preset, with the reason."""

from __future__ import annotations

import argparse
import collections
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from panoptic_jax import cli  # noqa: E402
from panoptic_jax.data.storage import open_file  # noqa: E402
from panoptic_jax.model import kmax_deeplab  # noqa: E402
from panoptic_jax.weights import importer, init_from  # noqa: E402


def _describe(tensors: dict[str, np.ndarray]) -> str:
  dtypes = collections.Counter(str(t.dtype) for t in tensors.values())
  numbers = sum(int(t.size) for t in tensors.values())
  return (f"{len(tensors)} tensors, {numbers:,} numbers ("
          + ", ".join(f"{n} {d}" for d, n in dtypes.most_common()) + ")")


def inspect(args: argparse.Namespace) -> int:
  num_classes = args.num_classes or kmax_deeplab.default_num_classes(args.preset)
  source = init_from.read_source(args.file, args.endpoint_url)
  print(f"{args.file}: {_describe(source.tensors)}")
  abstract = kmax_deeplab.abstract_model(args.preset, num_classes)
  targets = importer.variables(importer.model_variables(abstract))
  _, report = importer.plan(source.tensors, targets, kmax_deeplab.get_config(args.preset), num_classes,
                            source=args.file, file_class_names=source.class_names, exclude=args.exclude)
  print(f"onto {args.preset} ({num_classes} classes + void):")
  print(report.summary())
  if args.list:
    for target, sources in report.loaded.items():
      shape = targets[target].shape
      print(f"  {target} {shape} <- " + ", ".join(f"{s} {tuple(source.tensors[s].shape)}" for s in sources))
    for name in report.unused_expected:
      print(f"  (unused by design) {name} {tuple(source.tensors[name].shape)}")
    for target in report.left_at_init:
      print(f"  (left at initialisation) {target} {targets[target].shape}")
  if args.json:
    folder, name = open_file(args.json)
    folder.write_bytes(name, json.dumps(report.to_json(), indent=1).encode())
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.weights", description=__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("inspect", help="what a weights file holds and how it maps onto a preset")
  p.add_argument("file", help="a weights file (.pth, .pkl, .safetensors, .npz; local or s3://) or a run's workdir")
  p.add_argument("--preset", default="kmax_r50_coco", choices=sorted(kmax_deeplab.PRESETS))
  p.add_argument("--num_classes", type=int, default=0, help="classes without void (default: the preset's dataset)")
  p.add_argument("--exclude", default="", help="regex: our variables / the file's tensors to leave out")
  p.add_argument("--endpoint_url", default=None, help="S3 endpoint for s3:// files")
  p.add_argument("--list", action="store_true", help="one line per variable: what fills it")
  p.add_argument("--json", default="", help="also write the report here")
  args = parser.parse_args(argv)
  return inspect(args)


if __name__ == "__main__":
  cli.run(main)
