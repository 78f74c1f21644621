"""Exports a trained model: one artifact that runs with jax and numpy alone, or the network as ONNX.

  python -m panoptic_jax.export --workdir RUN --out ARTIFACT [--step N] [--crop_size H,W]
      [--platforms cpu,cuda,tpu] [--dtype float32|bfloat16] [--format jax|onnx]

`--format jax` (default) writes ARTIFACT/ with manifest.json, model.jaxexport (the network and the mask-wise merge,
any batch size, lowered for every platform asked) and weights.npz; run it with
`python -m panoptic_jax.inference.serving --model ARTIFACT --images LOCATION --out OUT` or
`Predictor.from_export(ARTIFACT)`. `--format onnx` adds ARTIFACT/model.onnx: images -> mask and class logits, for
onnxruntime and TensorRT (needs `pip install -r requirements-onnx.txt`).
"""

from __future__ import annotations

import argparse
import logging

from panoptic_jax import cli


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  parser.add_argument("--out", required=True, help="the artifact's folder")
  parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
  parser.add_argument("--crop_size", type=cli.pair_of_ints,
                      help="H,W: the inference size instead of the run's input.crop_size (sides of 32 k + 1)")
  parser.add_argument("--platforms", default="cpu,cuda,tpu", help="lowerings to include (default cpu,cuda,tpu)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="compute dtype (parameters are stored in float32)")
  parser.add_argument("--format", default="jax", choices=("jax", "onnx"),
                      help="jax: the jax.export artifact; onnx: that artifact and model.onnx beside it")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  cli.initialise_jax()
  from panoptic_jax.inference import export, trained_model  # Flax and the model: after the arguments are checked.

  model = trained_model.load(args.workdir, args.step, dtype=args.dtype, crop_size=args.crop_size)
  platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
  manifest = export.export(model, args.out, platforms, args.dtype, onnx=args.format == "onnx")
  print(f"exported {args.workdir} at step {model.step} for {', '.join(manifest['platforms'])} "
        f"({manifest['weights']['parameters']:,} weights) -> {args.out}")
  if "onnx" in manifest:
    print(f"ONNX: {manifest['onnx']['path']} (run it with onnx_export.run_onnx or onnxruntime)")
  return 0


if __name__ == "__main__":
  cli.run(main)
