"""Predicts panoptic maps for new images with a trained model, into a dataset in the project's format.

  python -m panoptic_jax.predict --workdir RUN --images LOCATION --out OUT [--step N] [--crop_size H,W]
      [--endpoint_url URL] [--coco [--coco_categories panoptic_val2017.json]] [--overlays] [--batch_size B]
      [--workers W]

RUN is a training workdir: the model is rebuilt from its config.json and its newest checkpoint (or `--step`), and
images are resized to fit its training crop (or `--crop_size`).
LOCATION is a folder of images, one image file, s3://bucket/prefix, or a dataset in the project's format (its
images/). OUT becomes a dataset in the project's format (metadata.yaml with the model's categories, one annotation
TIFF per image at the image's own size, the segments' scores in segments/<stem>.json, the images or links to them):
`python -m panoptic_jax.evaluate --gt GT --pred OUT` scores it, AP included. Each image is prepared and each map
restored exactly as the evaluation during training does, so an image gets the map that `--mode=eval` scored.
"""

from __future__ import annotations

import argparse

from panoptic_jax import cli
from panoptic_jax.inference import batch_predict


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.predict", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a training run's workdir")
  parser.add_argument("--step", type=int, help="the checkpoint's step (default: the newest)")
  parser.add_argument("--crop_size", type=cli.pair_of_ints,
                      help="H,W: the inference size instead of the run's input.crop_size (sides of 32 k + 1)")
  batch_predict.add_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  batch_predict.initialise(args)
  from panoptic_jax.inference.predictor import Predictor  # After jax.distributed is set up.
  predictor = Predictor.from_workdir(args.workdir, args.step, args.batch_size or None, args.crop_size)
  return batch_predict.run_command(predictor, args)


if __name__ == "__main__":
  cli.run(main, malloc_tunables=True)  # The network's temporaries stay mapped between batches (host_memory.py).
