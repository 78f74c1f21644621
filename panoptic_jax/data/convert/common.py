"""What the converters share: palettes, PNG id maps, writing in another label space, the parallel resumable run and
its summary.

A conversion is a list of `Example`s (one image + its source annotation) and a per-example function that turns one
into (image bytes, canonical panoptic map). `run_conversion` skips examples whose output annotation already exists,
converts the rest in worker processes, writes for each the image first and the annotation TIFF last (so an existing
annotation means the example is complete), writes metadata.yaml after every example, and returns a `Summary` of
converted / skipped / failed examples with the reason of each failure. One bad input fails its example only.

`LabelSpace` (`--class_map FILE.yaml --label_space ...`) writes the dataset in another label space, e.g. Mapillary
Vistas in Cityscapes' categories: each source category becomes the target category the class map names, or void;
things are renumbered per target class (a source crowd, instance 0, stays 0), stuff merges per target class.
"""

from __future__ import annotations

import collections
import colorsys
import concurrent.futures
import dataclasses
import io
import multiprocessing
import pathlib
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.class_map import ClassMap
from panoptic_jax.data.storage import open_storage
from panoptic_jax.errors import UserError

Color = tuple[int, int, int]


class ConversionError(UserError):
  """One example cannot be converted; the message says which input file and why (the run goes on)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One image and its source annotation, as the worker needs them (small and picklable).

  Attributes:
    stem: the output name: images/<stem><image_ext> and <annotations>/<stem>.tif.
    image_path: the source image file; copied byte for byte.
    annotation_path: the source annotation PNG (COCO panoptic RGB ids, Cityscapes instanceIds or panoptic PNG).
    segments: the source's segment list (COCO `segments_info`), or None for layouts without one.
    expected_hw: (H, W) the source metadata gives for the image, or None.
  """

  stem: str
  image_path: str
  annotation_path: str
  segments: tuple[dict[str, Any], ...] | None = None
  expected_hw: tuple[int, int] | None = None

  @property
  def image_ext(self) -> str:
    return pathlib.PurePath(self.image_path).suffix.lower()


@dataclasses.dataclass
class Summary:
  """The outcome of one run. `failed` and `unpaired` hold (name, reason)."""

  converted: list[str] = dataclasses.field(default_factory=list)
  skipped: list[str] = dataclasses.field(default_factory=list)
  failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  unpaired: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  stats: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  seconds: float = 0.0

  @property
  def ok(self) -> bool:
    return not self.failed

  def text(self, max_listed: int = 20) -> str:
    lines = [f"converted {len(self.converted)}, skipped {len(self.skipped)} (already done), "
             f"failed {len(self.failed)}, unpaired {len(self.unpaired)} in {self.seconds:.1f} s"]
    if self.stats:
      lines.append("segments: " + ", ".join(f"{k} {v}" for k, v in sorted(self.stats.items())))
    for title, items in (("failed", self.failed), ("unpaired (not converted)", self.unpaired)):
      if items:
        lines.append(f"{title}:")
        lines += [f"  {name}: {reason}" for name, reason in items[:max_listed]]
        if len(items) > max_listed:
          lines.append(f"  ... and {len(items) - max_listed} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Palettes


def _nearest_free(color: Color, used: set[Color]) -> Color:
  """The unused, non-black colour nearest to `color` (Chebyshev shells, then L1 distance, then RGB order)."""
  base = np.array(color, np.int64)
  for radius in range(1, 256):
    offsets = np.stack(np.meshgrid(*[np.arange(-radius, radius + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    offsets = offsets[np.abs(offsets).max(1) == radius]
    candidates = base + offsets
    candidates = candidates[((candidates >= 0) & (candidates <= 255)).all(1)]
    order = np.lexsort((candidates[:, 2], candidates[:, 1], candidates[:, 0], np.abs(candidates - base).sum(1)))
    for c in candidates[order]:
      c = (int(c[0]), int(c[1]), int(c[2]))
      if c != (0, 0, 0) and c not in used:
        return c
  raise ValueError("no free colour left")  # 2**24 - 1 colours; unreachable for real datasets.


def _generated_color(index: int) -> Color:
  """A deterministic, well spread colour for a category that has none (golden-ratio hues, varying value)."""
  hue = (index * 0.618033988749895) % 1.0
  value = 0.95 - 0.25 * ((index // 7) % 3)
  r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
  return (round(r * 255), round(g * 255), round(b * 255))


def resolve_colors(names: Sequence[str], colors: Sequence[Color | None]) -> tuple[Color, ...]:
  """Makes every category's colour unique and non-black, changing as little as possible, and logs each change.

  Categories are visited in order: the first keeps a contested colour and each later one moves to the nearest free
  colour. A category without a colour gets a generated one (then made unique the same way).
  """
  used: set[Color] = set()
  out: list[Color] = []
  for i, (name, color) in enumerate(zip(names, colors)):
    if color is None:
      new = _generated_color(i)
      if new in used or new == (0, 0, 0):
        new = _nearest_free(new, used)
      logging.info("category %r has no colour; using %s", name, list(new))
    else:
      color = tuple(int(c) for c in color)
      new = color
      if color == (0, 0, 0) or color in used:
        new = _nearest_free(color, used)
        why = "black is reserved for void" if color == (0, 0, 0) else "its colour is taken by an earlier category"
        logging.warning("category %r: colour %s changed to %s (%s)", name, list(color), list(new), why)
    used.add(new)
    out.append(new)
  return tuple(out)


# ----------------------------------------------------------------------------------------------------------------------
# Reading inputs (in workers)


def read_file(path: str, what: str) -> bytes:
  try:
    return pathlib.Path(path).read_bytes()
  except OSError as e:
    raise ConversionError(f"{what} {path}: cannot read: {e.strerror or e}") from None


def decode_png(data: bytes, path: str, what: str) -> np.ndarray:
  """Decodes a label PNG without any colour conversion: [H, W] or [H, W, C] as stored."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      if image.mode == "P":  # Palette PNGs store indices; the labels are the palette colours.
        image = image.convert("RGB")
      return np.asarray(image)
  except Exception as e:  # Pillow raises several types for corrupt input.
    raise ConversionError(f"{what} {path}: cannot decode as PNG: {type(e).__name__}: {e}") from None


def rgb_ids(label: np.ndarray, path: str, what: str) -> np.ndarray:
  """COCO panoptic PNG [H, W, 3] -> [H, W] int64 segment ids, id = R + 256 G + 256^2 B."""
  if label.ndim != 3 or label.shape[-1] not in (3, 4):
    raise ConversionError(f"{what} {path}: expected an RGB PNG (id = R + 256 G + 256^2 B), "
                          f"found shape {label.shape} {label.dtype}")
  label = label[..., :3].astype(np.int64)
  return label[..., 0] + 256 * label[..., 1] + 65536 * label[..., 2]


def check_image(data: bytes, path: str, label_hw: tuple[int, int], expected_hw: tuple[int, int] | None) -> None:
  """Decodes the image fully (catching truncated files) and checks its size against the annotation's."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      hw = (image.height, image.width)
  except Exception as e:  # Pillow raises several types for corrupt input.
    raise ConversionError(f"image {path}: cannot decode: {type(e).__name__}: {e}") from None
  if expected_hw is not None and tuple(expected_hw) != hw:
    raise ConversionError(f"image {path}: is {hw[0]}x{hw[1]} but the annotation JSON says "
                          f"{expected_hw[0]}x{expected_hw[1]}")
  if tuple(label_hw) != hw:
    raise ConversionError(f"image {path} is {hw[0]}x{hw[1]} but its annotation is {label_hw[0]}x{label_hw[1]}")


def _locate(ids: np.ndarray, listed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per pixel, the index of its id in the sorted `listed` ids, and whether it is listed at all.

  A binary search over the few listed ids per pixel: much cheaper than sorting all pixels (np.unique).
  """
  if len(listed) == 0:
    return np.zeros(ids.shape, np.intp), np.zeros(ids.shape, bool)
  pos = np.minimum(np.searchsorted(listed, ids), len(listed) - 1)
  return pos, listed[pos] == ids


def panoptic_from_segments(ids: np.ndarray, segments: Sequence[dict[str, Any]], category_index: dict[int, int],
                           info: fmt.DatasetInfo, crowd: str, where: str) -> tuple[np.ndarray, dict[str, int]]:
  """A COCO-style panoptic annotation ([H, W] segment ids + segments_info) -> (int32 [H, W] canonical map, stats).

  Thing instances get ids 1..K in `segments` order (unique in the image); stuff gets 0; crowd segments become VOID
  (`crowd="ignore"`) or keep their category with id 0 (`crowd="keep"`); categories mapped to VOID by
  `category_index` (e.g. Cityscapes' ignoreInEval labels) and id 0 when unlisted become VOID.

  Raises:
    ConversionError: naming `where`, for malformed entries, duplicate ids, categories not in `category_index`,
      segment pixel counts that differ from the listed areas, or PNG ids that are not listed.
  """
  parsed = []
  for s in segments:
    try:
      parsed.append((int(s["id"]), int(s["category_id"]), int(s["area"]), bool(s.get("iscrowd") or 0)))
    except (KeyError, TypeError, ValueError):
      raise ConversionError(f"annotation {where}: segments_info entry {s!r} needs integer id, category_id and "
                            "area") from None
  listed = np.array(sorted(p[0] for p in parsed), np.int64)
  duplicated = listed[1:][listed[1:] == listed[:-1]]
  if len(duplicated):
    raise ConversionError(f"annotation {where}: segment id {int(duplicated[0])} is listed twice in segments_info")
  pos, is_listed = _locate(ids, listed)
  unlisted = ~is_listed & (ids != 0)
  if unlisted.any():
    uniq, counts = np.unique(ids[unlisted], return_counts=True)
    shown = ", ".join(f"{u} ({n} px)" for u, n in zip(uniq[:5].tolist(), counts[:5].tolist()))
    raise ConversionError(f"annotation {where}: {len(uniq)} segment ids in the PNG are not listed in "
                          f"segments_info: {shown}{' ...' if len(uniq) > 5 else ''}")
  areas = np.bincount(pos[is_listed], minlength=len(listed))
  slot = {int(sid): k for k, sid in enumerate(listed)}

  lut = np.full(len(listed) + 1, fmt.VOID, np.int32)  # The extra last slot: id 0 (void).
  stats: collections.Counter = collections.Counter()
  next_instance = 1
  for sid, cid, area, is_crowd in parsed:
    if cid not in category_index:
      raise ConversionError(f"annotation {where}: segment {sid} has category_id {cid}, which is not a known "
                            "category")
    found = int(areas[slot[sid]])
    if found != area:
      raise ConversionError(f"annotation {where}: segment {sid} (category_id {cid}) has {found} pixels in the PNG "
                            f"but its listed area is {area}")
    category = category_index[cid]
    if category == fmt.VOID:
      stats["ignored-class segments to void"] += 1
    elif is_crowd:
      stats[f"crowd {'kept' if crowd == 'keep' else 'to void'}"] += 1
      if crowd == "keep":
        lut[slot[sid]] = category * info.label_divisor
    elif info.is_thing[category]:
      lut[slot[sid]] = category * info.label_divisor + next_instance
      next_instance += 1
      stats["thing instances"] += 1
    else:
      lut[slot[sid]] = category * info.label_divisor
      stats["stuff segments"] += 1
  check_instance_count(next_instance - 1, info, where)
  return lut[np.where(is_listed, pos, len(listed))], stats


def check_instance_count(count: int, info: fmt.DatasetInfo, where: str) -> None:
  if count >= info.label_divisor:
    raise ConversionError(f"annotation {where}: {count} thing instances; at most {info.label_divisor - 1} fit "
                          f"label_divisor {info.label_divisor}")


CROWD_MODES = ("ignore", "keep")


def check_arguments(crowd: str, split: str | None = None) -> None:
  """The arguments every converter shares: raises ValueError naming a crowd mode or split name that is not one."""
  if crowd not in CROWD_MODES:
    raise ValueError(f"crowd: expected one of {CROWD_MODES}, found {crowd!r}")
  if split is not None and not re.fullmatch(r"[\w.-]+", split):
    raise ValueError(f"split: expected a folder name such as train or val, found {split!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Another label space


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """The label space to write a conversion in: its metadata (categories, things, colours) and the class map from the
  source's category names to its names."""
  target: fmt.DatasetInfo
  class_map: ClassMap


@dataclasses.dataclass(frozen=True)
class Relabel:
  """Source canonical maps -> target canonical maps: `table[c]` is the target category of source category c, -1
  void."""
  source: fmt.DatasetInfo
  target: fmt.DatasetInfo
  table: tuple[int, ...]

  def __call__(self, panoptic: np.ndarray, where: str) -> np.ndarray:
    values = np.unique(panoptic)
    new = np.full(len(values), fmt.VOID, np.int64)
    instances: collections.Counter = collections.Counter()
    div_in, div_out = self.source.label_divisor, self.target.label_divisor
    for i, value in enumerate(values.tolist()):  # Ascending: instances keep their relative order.
      category = self.table[value // div_in] if value >= 0 else -1
      if category < 0:
        continue
      if not self.target.is_thing[category]:
        new[i] = category * div_out
      elif self.source.is_thing[value // div_in] and value % div_in == 0:
        new[i] = category * div_out  # A kept crowd region stays a crowd region.
      else:
        instances[category] += 1
        check_instance_count(instances[category], self.target, where)
        new[i] = category * div_out + instances[category]
    return new[np.searchsorted(values, panoptic)].astype(np.int32)


def relabel(info: fmt.DatasetInfo, space: LabelSpace) -> Relabel:
  """The Relabel of a conversion whose source metadata is `info`; raises ClassMapError on a bad class map."""
  table, report = space.class_map.resolve(info.categories, space.target.categories, "the source's categories",
                                          "the label space's categories")
  logging.info("Writing in the label space of %d categories through %s: %d source categories mapped, void: %s; "
               "no source category for: %s", len(space.target.categories), space.class_map.where,
               len(report.mapped), list(report.ignored) or "none", list(report.unreached) or "none")
  return Relabel(info, space.target, tuple(int(t) for t in table))


# ----------------------------------------------------------------------------------------------------------------------
# The parallel, resumable run

_WORKER: dict[str, Any] = {}


def _init_worker(location: str, endpoint_url: str | None, info: fmt.DatasetInfo,
                 convert_fn: Callable[..., tuple[bytes, np.ndarray, dict]], options: dict[str, Any],
                 relabel_fn: Relabel | None) -> None:
  _WORKER.update(storage=open_storage(location, endpoint_url), info=info, convert_fn=convert_fn, options=options,
                 relabel=relabel_fn)


def _convert_one(example: Example) -> tuple[str, str, str, dict]:
  """Converts and writes one example in a worker. Returns (stem, status, reason, stats); never raises."""
  info: fmt.DatasetInfo = _WORKER["info"]
  relabel_fn: Relabel | None = _WORKER["relabel"]
  try:
    image_bytes, panoptic, stats = _WORKER["convert_fn"](example, info, **_WORKER["options"])
    if relabel_fn is not None:
      panoptic, info = relabel_fn(panoptic, example.annotation_path), relabel_fn.target
    annotation = fmt.encode_annotation(panoptic, info)
    storage = _WORKER["storage"]
    storage.write_bytes(f"images/{example.stem}{example.image_ext}", image_bytes)
    storage.write_bytes(f"{info.annotations}/{example.stem}.tif", annotation)  # Last: its presence means done.
  except ConversionError as e:
    return example.stem, "failed", str(e), {}
  except Exception as e:  # Anything else (storage, encoding) fails this example with its type and message.
    return example.stem, "failed", f"{type(e).__name__}: {e}", {}
  return example.stem, "converted", "", stats


def _existing_annotations(storage, folder: str) -> set[str]:
  names = set()
  for name in storage.list_files(folder):
    path = pathlib.PurePosixPath(name)
    if path.suffix.lower() in fmt.ANNOTATION_EXTENSIONS:
      names.add(path.stem)
  return names


def run_conversion(examples: Sequence[Example], info: fmt.DatasetInfo,
                   convert_fn: Callable[..., tuple[bytes, np.ndarray, dict]], *, out: str,
                   endpoint_url: str | None = None, workers: int = 1, options: dict[str, Any] | None = None,
                   unpaired: Iterable[tuple[str, str]] = (), failed: Iterable[tuple[str, str]] = (),
                   provenance: str = "", progress: bool = True, label_space: LabelSpace | None = None) -> Summary:
  """Converts `examples` into the dataset at `out` and writes metadata.yaml last.

  Args:
    examples: what to convert; stems must be unique.
    info: the output dataset's metadata.
    convert_fn: `convert_fn(example, info, **options) -> (image bytes, int32 [H, W] canonical map, stats)`, a
      module-level function (it is sent to worker processes); raises ConversionError for bad input.
    out: the output location, a folder or s3://bucket/prefix.
    endpoint_url: the S3 endpoint for s3:// locations.
    workers: worker processes; 0 or 1 converts in this process.
    options: keyword arguments for `convert_fn`.
    unpaired: (name, reason) of source files without a partner, left out (reported, not a failure).
    failed: (name, reason) of examples found invalid before conversion (e.g. an annotation whose image is unknown).
    provenance: a comment line (without '#') appended to metadata.yaml saying how the dataset was made.
    progress: show a tqdm progress bar.
    label_space: write the dataset in this label space instead of the source's (module docstring).

  Returns:
    The run's Summary.
  """
  start = time.perf_counter()
  options = dict(options or {})
  relabel_fn = None
  if label_space is not None:
    relabel_fn = relabel(info, label_space)
    provenance = f"{provenance}; relabelled through {label_space.class_map.where}".lstrip("; ")
  out_info = relabel_fn.target if relabel_fn is not None else info
  summary = Summary(unpaired=list(unpaired), failed=list(failed))
  stems = collections.Counter(e.stem for e in examples)
  duplicates = sorted(s for s, n in stems.items() if n > 1)
  if duplicates:
    raise ValueError(f"several inputs map to the same output name: {duplicates[:10]}"
                     f"{' ...' if len(duplicates) > 10 else ''}; image names must be unique")
  storage = open_storage(out, endpoint_url)
  _check_existing_metadata(storage, out_info, out, provenance)
  done = _existing_annotations(storage, out_info.annotations)
  summary.skipped = [e.stem for e in examples if e.stem in done]
  todo = [e for e in examples if e.stem not in done]

  bar = _progress(len(todo), progress)
  if workers <= 1:
    _init_worker(out, endpoint_url, info, convert_fn, options, relabel_fn)
    results: Iterable = map(_convert_one, todo)
    pool = None
  else:
    context = multiprocessing.get_context("spawn")  # No fork: the parent may hold threads (JAX, s3fs event loops).
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                  initargs=(out, endpoint_url, info, convert_fn, options, relabel_fn))
    chunksize = max(1, min(16, len(todo) // (workers * 8)))
    results = pool.map(_convert_one, todo, chunksize=chunksize)
  try:
    for stem, status, reason, stats in results:
      if status == "converted":
        summary.converted.append(stem)
        summary.stats.update(stats)
      else:
        summary.failed.append((stem, reason))
      bar.update(1)
  finally:
    bar.close()
    if pool is not None:
      pool.shutdown(cancel_futures=True)

  text = fmt.metadata_yaml(out_info)
  if provenance:
    text += f"# {provenance}\n"
  storage.write_bytes("metadata.yaml", text.encode())
  summary.seconds = time.perf_counter() - start
  return summary


def _check_existing_metadata(storage, info: fmt.DatasetInfo, out: str, provenance: str) -> None:
  """A resumed run must produce the same dataset: refuse to mix with a different one already at `out`."""
  if not storage.exists("metadata.yaml"):
    return
  text = storage.read_bytes("metadata.yaml").decode()
  old = fmt.parse_metadata(text, f"{out}/metadata.yaml")
  old_provenance = [line[2:] for line in text.splitlines() if line.startswith("# converted from")]
  if provenance and old_provenance and old_provenance[-1] != provenance:
    raise ValueError(f"{out}/metadata.yaml says the dataset there was {old_provenance[-1]!r}; this run would be "
                     f"{provenance!r}. Convert into an empty location or remove the old dataset first")
  if (old.categories, old.colors, old.is_thing, old.annotations) != (info.categories, info.colors, info.is_thing,
                                                                    info.annotations):
    raise ValueError(f"{out}/metadata.yaml describes a different dataset (categories, colours or things differ from "
                     "this conversion's); convert into an empty location or remove the old dataset first")


class _NoBar:
  def update(self, n: int) -> None:
    del n

  def close(self) -> None:
    pass


def _progress(total: int, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, unit="img", desc="converting", file=sys.stderr, dynamic_ncols=True)


def finish(summary: Summary) -> int:
  """Prints the summary; returns the process exit code (1 if any example failed)."""
  print(summary.text())
  return 0 if summary.ok else 1
