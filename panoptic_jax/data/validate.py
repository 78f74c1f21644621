"""Validates a dataset and summarises it.

    python -m panoptic_jax.data.validate LOCATION [--endpoint_url URL] [--json FILE] [--workers N] [--headers_only]

LOCATION is a folder or `s3://bucket/prefix`. Every image is decoded in full (a truncated or corrupt file is an
error, as it would be in training), every annotation is decoded against its image's size, and the summary is
printed: images, annotated images, unpaired files (count and names), per category the number of segments, pixels (at
image resolution) and images (things / stuff marked), void pixels and their share, annotation scales ("1x: 40, 2x:
10") and instance-id dtypes. A semantic dataset (`task: semantic segmentation`: label images, README "Semantic-only
external sets") is summarised the same way without segments, kinds and instance ids. `--json FILE` writes the same
summary as JSON. Exit status 1, with the list of errors (file: reason), when anything is invalid; 0 otherwise.
Files without a partner are reported, not errors (images alone are valid for prediction).

`--headers_only` reads only the image headers (the size): faster, since no pixels are decoded, but blind to truncated
or corrupt pixel data. The final line then says that the images were only header-checked, never that every file is
valid, and the JSON summary has "images_decoded": false.

Work is spread over `--workers` threads (default: the CPU count, at most 8): reading is I/O and TIFF / zlib decoding
and numpy release the GIL much of the time. `--processes` uses worker processes instead (spawned, each with its own
storage client); they pay about 2 s of start-up each, so they only pay off on large local datasets.
"""

import argparse
import collections
import concurrent.futures
import io
import json
import logging
import multiprocessing
import os
import sys

import numpy as np
import tifffile
import tqdm
from PIL import ImageFile

from panoptic_jax import cli
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.dataset import Dataset, image_size
from panoptic_jax.data.storage import StorageError, open_file

_MAX_NAMES = 20

# Per worker process (or the main process for --workers 0): set by _init_worker.
_STORAGE = None
_INFO = None
_HEADERS_ONLY = False


def _init_worker(storage, info, headers_only: bool = False) -> None:
  global _STORAGE, _INFO, _HEADERS_ONLY
  _STORAGE, _INFO, _HEADERS_ONLY = storage, info, headers_only


def _reason(message: str, where: str) -> str:
  return message.removeprefix(f"{where}: ")


def _id_dtype(data: bytes) -> str:
  """The dtype of page 2 (instance ids) from a panoptic TIFF's header; only used after a successful decode."""
  with tifffile.TiffFile(io.BytesIO(data)) as tiff:
    return str(tiff.pages[1].dtype)


def _stats(panoptic: np.ndarray, info: fmt.DatasetInfo) -> tuple[np.ndarray, np.ndarray, int]:
  """Per category segment and pixel counts, and the void pixel count, of one canonical map."""
  flat = panoptic.ravel()
  void = int(np.count_nonzero(flat == fmt.VOID))
  if info.num_classes * info.label_divisor <= 1 << 24:
    counts = np.bincount(flat + 1, minlength=1)[1:]
    values = np.flatnonzero(counts)
    pixels_per_value = counts[values]
  else:
    values, pixels_per_value = np.unique(flat[flat != fmt.VOID], return_counts=True)
  categories = values // info.label_divisor
  segments = np.bincount(categories, minlength=info.num_classes)
  pixels = np.bincount(categories, weights=pixels_per_value, minlength=info.num_classes).astype(np.int64)
  return segments, pixels, void


def _check(task: tuple[str, str | None, str | None]) -> dict:
  """Validates one item (image and / or annotation); returns its statistics and errors."""
  name, image_path, annotation_path = task
  storage, info = _STORAGE, _INFO
  result = {"name": name, "errors": [], "paired": image_path is not None and annotation_path is not None}
  paths = [p for p in (image_path, annotation_path) if p is not None]
  try:
    blobs = dict(zip(paths, storage.read_many(paths)))
  except StorageError:  # Read one by one to know which file failed.
    blobs = {}
    for path in paths:
      try:
        blobs[path] = storage.read_bytes(path)
      except StorageError as e:
        result["errors"].append((storage.url(path), str(e)))
  image_hw = None
  if image_path in blobs:
    where = storage.url(image_path)
    try:
      if _HEADERS_ONLY:
        image_hw = image_size(blobs[image_path], where)
      else:
        image_hw = fmt.decode_image(blobs[image_path], where).shape[:2]
    except fmt.FormatError as e:
      result["errors"].append((where, _reason(str(e), where)))
  if annotation_path in blobs and (image_path is None or image_hw is not None):
    where = storage.url(annotation_path)
    try:
      stored = fmt.decode_annotation(blobs[annotation_path], info, where=where)  # At the file's own size.
      panoptic = fmt.fit_to_image(stored, image_hw, where)
    except fmt.FormatError as e:
      result["errors"].append((where, _reason(str(e), where)))
    else:
      if not info.is_semantic:
        result["id_dtype"] = _id_dtype(blobs[annotation_path])
      if image_hw is not None:
        result["scale"] = f"{round(image_hw[0] / stored.shape[0], 2):g}x"
      result["segments"], result["pixels"], result["void"] = _stats(panoptic, info)
  return result


def _names(paths: list[str]) -> list[str]:
  return [p.rsplit("/", 1)[-1] for p in paths]


def validate_dataset(location: str, endpoint_url: str | None = None, workers: int | None = None,
                    progress: bool = True, processes: bool = False, headers_only: bool = False) -> dict:
  """Validates every file of a dataset; returns the summary (JSON-serialisable) with an "errors" list.

  Args:
    location: folder or s3://bucket/prefix.
    endpoint_url: S3 endpoint.
    workers: threads (or processes) checking files; None: the CPU count, at most 8.
    progress: show a progress bar on stderr.
    processes: worker processes instead of threads.
    headers_only: read image headers only (the summary's "images_decoded" is then False); default: decode fully.

  Raises:
    RuntimeError: Pillow is set to accept truncated images (PIL.ImageFile.LOAD_TRUNCATED_IMAGES) without
      headers_only.
  """
  if ImageFile.LOAD_TRUNCATED_IMAGES and not headers_only:  # Set by some import: Pillow then pads truncated files.
    raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process, so truncated images would "
                       "decode without error and pass validation; set it to False before validating")
  try:
    dataset = Dataset.open(location, endpoint_url)
  except (StorageError, fmt.FormatError) as e:
    return {"location": str(location), "valid": False, "images_decoded": not headers_only,
            "errors": [{"file": str(location), "reason": str(e)}]}
  storage, info = dataset.storage, dataset.info
  tasks = [(e.name, e.image, e.annotation) for e in dataset.examples]
  tasks += [(p, p, None) for p in dataset.unpaired_images]
  tasks += [(p, None, p) for p in dataset.unpaired_annotations]

  segments = np.zeros(info.num_classes, np.int64)
  pixels = np.zeros(info.num_classes, np.int64)
  images_with = np.zeros(info.num_classes, np.int64)
  void = 0
  scales, dtypes = collections.Counter(), collections.Counter()
  errors = []
  workers = min(8, os.cpu_count() or 1) if workers is None else workers
  bar = tqdm.tqdm(total=len(tasks), desc="validate", unit="file", file=sys.stderr, disable=not progress)

  def consume(results):
    nonlocal void
    for r in results:
      bar.update(1)
      errors.extend({"file": f, "reason": reason} for f, reason in r["errors"])
      if "id_dtype" in r:
        dtypes[r["id_dtype"]] += 1
      if r["paired"] and "segments" in r:
        segments[:] += r["segments"]
        pixels[:] += r["pixels"]
        images_with[:] += r["segments"] > 0
        void += r["void"]
        scales[r["scale"]] += 1

  try:
    if workers <= 1:
      _init_worker(storage, info, headers_only)
      consume(map(_check, tasks))
    elif not processes:
      _init_worker(storage, info, headers_only)
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        consume(pool.map(_check, tasks))
    else:
      # spawn: workers start clean (no inherited s3fs event-loop threads); the storage is pickled to each.
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(storage, info, headers_only)) as pool:
        consume(pool.map(_check, tasks, chunksize=max(1, min(16, len(tasks) // (4 * workers)))))
  finally:
    bar.close()

  labelled = int(pixels.sum())
  if info.is_semantic:
    categories = [{"name": name, "color": list(color) if color else None, "pixels": int(p), "images": int(n)}
                  for name, color, p, n in zip(info.categories, info.colors, pixels, images_with)]
  else:
    categories = [{"name": name, "kind": "thing" if thing else "stuff", "color": list(color) if color else None,
                   "segments": int(s), "pixels": int(p), "images": int(n)}
                  for name, thing, color, s, p, n in zip(info.categories, info.is_thing, info.colors, segments, pixels,
                                                         images_with)]
  return {
      "location": storage.describe(),
      "task": info.task,
      "valid": not errors,
      "images_decoded": not headers_only,
      "images": dataset.num_images,
      "annotations": dataset.num_annotations,
      "annotated_images": len(dataset.examples),
      "unpaired_images": {"count": len(dataset.unpaired_images), "names": _names(dataset.unpaired_images)},
      "unpaired_annotations": {"count": len(dataset.unpaired_annotations),
                               "names": _names(dataset.unpaired_annotations)},
      "categories": categories,
      "void_pixels": int(void),
      "void_share": void / (void + labelled) if void + labelled else None,  # Of the annotated images' pixels.
      "annotation_scales": dict(sorted(scales.items(), key=lambda kv: float(kv[0][:-1]))),
      "id_dtypes": dict(sorted(dtypes.items())),
      "errors": errors,
  }


def _counts(counter: dict) -> str:
  return ", ".join(f"{k}: {v}" for k, v in counter.items()) or "none"


def format_summary(summary: dict) -> str:
  """The human-readable report printed by the command."""
  lines = [f"dataset: {summary['location']}"]
  if "images" in summary:
    def unpaired(key, what):
      u = summary[key]
      names = ", ".join(u["names"][:_MAX_NAMES]) + (f" and {u['count'] - _MAX_NAMES} more"
                                                    if u["count"] > _MAX_NAMES else "")
      return f"  {what}: {u['count']}" + (f" ({names})" if u["count"] else "")
    semantic = summary.get("task") == fmt.SEMANTIC_TASK
    share = summary.get("void_share")
    lines += [f"  task: {summary.get('task', fmt.TASK)}", f"  images: {summary['images']}",
              f"  annotations: {summary['annotations']}", f"  annotated images: {summary['annotated_images']}",
              unpaired("unpaired_images", "images without annotation"),
              unpaired("unpaired_annotations", "annotations without image"),
              f"  annotation scales: {_counts(summary['annotation_scales'])}"]
    if not semantic:
      lines.append(f"  instance-id dtypes: {_counts(summary['id_dtypes'])}")
    lines += [f"  void pixels: {summary['void_pixels']}" + (f" ({100 * share:.2f}%)" if share is not None else ""),
              f"  categories ({len(summary['categories'])}):"]
    width = max(8, *(len(c["name"]) for c in summary["categories"]))
    if semantic:
      lines.append(f"    {'name':<{width}}  {'images':>7}  {'pixels':>13}")
      lines += [f"    {c['name']:<{width}}  {c['images']:>7}  {c['pixels']:>13}" for c in summary["categories"]]
    else:
      lines.append(f"    {'name':<{width}}  kind   {'segments':>9}  {'images':>7}  {'pixels':>13}")
      lines += [f"    {c['name']:<{width}}  {c['kind']:<5}  {c['segments']:>9}  {c['images']:>7}  {c['pixels']:>13}"
                for c in summary["categories"]]
  errors = summary["errors"]
  if errors:
    lines.append(f"INVALID: {len(errors)} errors")
    lines += [f"  {e['file']}: {e['reason']}" for e in errors]
  elif summary.get("images_decoded", True):
    lines.append("OK: every file is valid")
  else:
    lines.append("OK: every annotation is valid; images were only header-checked (--headers_only): their pixels were "
                 "not decoded, so truncated or corrupt images are not ruled out")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.data.validate", description=__doc__.split("\n")[0])
  parser.add_argument("location", help="dataset folder or s3://bucket/prefix")
  parser.add_argument("--endpoint_url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / profile)")
  parser.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON to FILE")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker threads (default: CPU count, at most 8; 0 or 1: none)")
  parser.add_argument("--processes", action="store_true",
                      help="worker processes instead of threads (each starts in about 2 s; for large local datasets)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
  parser.add_argument("--headers_only", action="store_true",
                      help="read only image headers (faster; does not catch truncated or corrupt pixel data)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
  summary = validate_dataset(args.location, args.endpoint_url, args.workers, progress=not args.no_progress,
                            processes=args.processes, headers_only=args.headers_only)
  print(format_summary(summary))
  if args.json:
    folder, name = open_file(args.json, args.endpoint_url)
    folder.write_bytes(name, (json.dumps(summary, indent=2) + "\n").encode())
  return 0 if summary["valid"] else 1


if __name__ == "__main__":
  cli.run(main)
