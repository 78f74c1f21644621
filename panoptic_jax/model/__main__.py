"""`python -m panoptic_jax.model --preset NAME [--num_classes C]`: parameter counts per part, computed abstractly
(nnx.eval_shape: no weights are materialised)."""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from panoptic_jax import cli  # noqa: E402
from panoptic_jax.model.kmax_deeplab import PRESETS, abstract_model, default_num_classes, param_breakdown  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.model", description=__doc__)
  parser.add_argument("--preset", default="kmax_r50_coco", choices=sorted(PRESETS))
  parser.add_argument("--num_classes", type=int, default=None,
                      help="classes without void (default: the preset's dataset, else 133)")
  args = parser.parse_args(argv)
  num_classes = args.num_classes
  if num_classes is None:
    num_classes = default_num_classes(args.preset)
  t0 = time.perf_counter()
  parts = param_breakdown(abstract_model(args.preset, num_classes))
  dt = time.perf_counter() - t0
  print(f"{args.preset} ({num_classes} classes + void), counted abstractly in {dt:.1f} s")
  rows = [("backbone", "backbone"), ("pixel decoder", "pixel_decoder"),
          ("transformer decoder + heads", "transformer_decoder_and_heads"),
          ("auxiliary semantic head", "aux_semantic_head"), ("total without aux head", "total_without_aux"),
          ("total with aux head", "total_with_aux")]
  for label, key in rows:
    print(f"  {label:<30} {parts[key]:>14,}  ({parts[key] / 1e6:.2f}M)")
  return 0


if __name__ == "__main__":
  cli.run(main)
