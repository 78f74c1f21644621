"""Predicts a whole location of images into an output dataset: what `python -m panoptic_jax.predict` and
`python -m panoptic_jax.inference.serving` run, with any `Predictor` (a workdir's model or an exported one).

Three stages overlap: reader threads read, decode and prepare the next images (`--workers`), the device computes
one batch while the next is gathered and dispatched, writer threads restore maps to each image's size and write
them. The run is resumable: an image
whose outputs are all written is skipped. An image that cannot be read or decoded is named in the log, counted and
skipped; the summary at the end lists them, and the exit status is then 1. With several processes (`--multihost`
or `--coordinator_address`), each process predicts every `process_count`-th image on its own devices.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import logging
import os
import sys
import time
from typing import Any

import numpy as np
import tqdm

from panoptic_jax import cli
from panoptic_jax.data.dataset_format import FormatError
from panoptic_jax.data.storage import StorageError
from panoptic_jax.inference.images import ImageSource
from panoptic_jax.inference.outputs import PredictionWriter
from panoptic_jax.inference.predictor import Predictor

_SHOWN_FAILURES = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The options of both prediction commands (beside the model's)."""
  parser.add_argument("--images", required=True,
                      help="a folder of images, one image file, s3://bucket/prefix, or a dataset in the project's "
                           "format (its images/)")
  parser.add_argument("--out", required=True, help="output dataset location (folder or s3://bucket/prefix)")
  parser.add_argument("--endpoint_url", help="S3 endpoint for s3:// locations")
  parser.add_argument("--coco", action="store_true", help="also write COCO panoptic PNGs and JSON (with scores)")
  parser.add_argument("--coco_categories",
                      help="a COCO panoptic JSON whose categories give the COCO ids by name (default 1..C)")
  parser.add_argument("--overlays", action="store_true", help="also write a picture per image (segments, legend)")
  parser.add_argument("--batch_size", type=int, default=0,
                      help="images per device call (default: one per local device)")
  parser.add_argument("--workers", type=int, default=0,
                      help="reader and writer threads each (default: the number of cores, at least 2)")
  parser.add_argument("--multihost", action="store_true",
                      help="several processes: initialise jax.distributed from the environment (TPU VMs, SLURM)")
  parser.add_argument("--coordinator_address", help="several processes: host:port of process 0")
  parser.add_argument("--num_processes", type=int, help="several processes: their number")
  parser.add_argument("--process_id", type=int, help="several processes: this one's index")


def initialise(args: argparse.Namespace) -> None:
  """Logging, the other processes of a multi-process run, and the persistent compilation cache."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  cli.initialise_jax(args.coordinator_address, args.num_processes, args.process_id, args.multihost)


def predict_location(predictor: Predictor, source: ImageSource, writer: PredictionWriter, *, workers: int = 2,
                     process_index: int = 0, process_count: int = 1, progress: bool = True) -> dict[str, Any]:
  """Predicts this process's share of `source` into `writer`; returns the summary.

  Returns:
    {"images": this process's share, "written", "skipped" (already written), "failed": [(name, reason)],
     "seconds", "images_per_s" (written per second of the whole run)}.
  """
  start = time.perf_counter()
  mine = list(range(process_index, len(source), process_count))
  todo = [i for i in mine if not writer.done(source.entries[i].name)]
  skipped = len(mine) - len(todo)
  if skipped:
    logging.info("%d of %d images already have their outputs in %s; skipping them", skipped, len(mine),
                 writer.storage.describe())
  failed: list[tuple[str, str]] = []
  written = 0

  def read(i: int):
    try:
      image = source.read(i)
    except (FormatError, StorageError, OSError) as e:
      return i, None, None, str(e)
    crop, content_hw = predictor.prepare(image)
    return i, image, (crop, content_hw), None

  def write(i: int, image: np.ndarray, outputs: dict, content_hw) -> None:
    result = predictor.finish(outputs, content_hw, image.shape[:2])
    entry = source.entries[i]
    writer.write(entry.name, image, result.panoptic, result.scores, source=(source.storage, entry.relpath))

  bar = tqdm.tqdm(total=len(todo), unit="img", disable=not progress, file=sys.stderr, dynamic_ncols=True,
                  mininterval=1.0 if sys.stderr.isatty() else 30.0)
  lookahead = max(4 * predictor.batch_size, 2 * workers)
  with concurrent.futures.ThreadPoolExecutor(workers, "read") as readers, \
       concurrent.futures.ThreadPoolExecutor(workers, "write") as writers:
    pending_reads: collections.deque = collections.deque()
    pending_writes: collections.deque = collections.deque()
    queue = iter(todo)

    def refill() -> None:
      for i in queue:
        pending_reads.append(readers.submit(read, i))
        if len(pending_reads) >= lookahead:
          return

    def drain_writes(limit: int) -> None:
      nonlocal written
      while len(pending_writes) > limit:
        pending_writes.popleft().result()  # A failed write (disk full, no permission) stops the run.
        written += 1
        bar.update(1)

    def finish(in_flight) -> None:
      handle, batch = in_flight
      for (i, image, (_, content_hw)), out in zip(batch, predictor.collect(handle)):
        pending_writes.append(writers.submit(write, i, image, out, content_hw))
      drain_writes(limit=lookahead)

    refill()
    batch: list = []
    in_flight = None  # The batch the device is computing while the next one is gathered.
    while pending_reads or batch:
      if pending_reads:
        i, image, prepared, error = pending_reads.popleft().result()
        refill()
        if error is not None:
          failed.append((source.entries[i].name, error))
          logging.warning("skipped %s: %s", source.url(i), error)
          bar.update(1)
        else:
          batch.append((i, image, prepared))
        if len(batch) < predictor.batch_size and pending_reads:
          continue
      if not batch:
        continue
      handle = predictor.dispatch([crop for _, _, (crop, _) in batch])
      if in_flight is not None:
        finish(in_flight)
      in_flight, batch = (handle, batch), []
    if in_flight is not None:
      finish(in_flight)
    drain_writes(limit=0)
  bar.close()
  seconds = time.perf_counter() - start
  return {"images": len(mine), "written": written, "skipped": skipped, "failed": failed, "seconds": seconds,
          "images_per_s": written / seconds if seconds > 0 else 0.0}


def format_summary(summary: dict[str, Any], out: str) -> str:
  failed = summary["failed"]
  lines = [f"{summary['written']} written, {summary['skipped']} skipped (already written), {len(failed)} failed, "
           f"of {summary['images']} images, in {summary['seconds']:.1f} s ({summary['images_per_s']:.2f} images/s) "
           f"-> {out}"]
  for name, reason in failed[:_SHOWN_FAILURES]:
    lines.append(f"  failed: {name}: {reason}")
  if len(failed) > _SHOWN_FAILURES:
    lines.append(f"  ... and {len(failed) - _SHOWN_FAILURES} more (see the warnings above)")
  return "\n".join(lines)


def run_command(predictor: Predictor, args: argparse.Namespace) -> int:
  """The body of both commands once the model is loaded; exit status 0, or 1 when images failed."""
  import jax

  source = ImageSource.open(args.images, args.endpoint_url)

  def open_writer() -> PredictionWriter:
    return PredictionWriter(args.out, predictor.info, endpoint_url=args.endpoint_url, coco=args.coco,
                            overlays=args.overlays, coco_categories=args.coco_categories)

  writer = open_writer()
  logging.info("Predicting %s with %s (batches of %d) into %s", source.describe(), predictor.description,
               predictor.batch_size, writer.storage.describe())
  summary = predict_location(predictor, source, writer, workers=args.workers or max(2, os.cpu_count() or 1),
                             process_index=jax.process_index(), process_count=jax.process_count())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("panoptic_jax_predictions_written")
    # Process 0 lists OUT afresh, so that the COCO JSON covers every process's images.
    writer = open_writer() if jax.process_index() == 0 else None
  if writer is not None:
    written = writer.close()
    if "coco_json" in written:
      logging.info("COCO panoptic JSON of %d images: %s", written["coco_images"], written["coco_json"])
  print(format_summary(summary, args.out))
  return 1 if summary["failed"] else 0
