"""Host-driven evaluation: batches of canonical maps -> jitted PQ / confusion statistics -> PQ, mIoU and AP.

`Evaluator` takes images one at a time (any sizes), pads them to a common shape (VOID pixels change no statistic),
runs `panoptic_stats` on fixed-size batches (sharded over the local devices when the batch divides evenly), and
reduces on the host in float64. Thing segments with scores also feed COCO mask AP (`instance.py`).

`open_dataset_side` / `open_coco_side` / `evaluate_sides` read both sides of an evaluation from the project's dataset
format or COCO panoptic format, align categories and images, and run the Evaluator (used by
`python -m panoptic_jax.evaluate`). Segment scores, for AP, come from COCO `segments_info` entries' `score`, or from a
project-format prediction's segment lists `segments/<stem>.json` (dataset_format's docstring; the prediction command
writes them): each (category name, on-disk instance id) is mapped to the value decoding gives that segment, the rank
of the id among the category's listed ids, then to the GT's categories.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import multiprocessing
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from panoptic_jax.errors import UserError
from panoptic_jax.evaluation import instance as instance_lib
from panoptic_jax.evaluation import semantic as semantic_lib
from panoptic_jax.evaluation.coco_format import CocoFormatError, CocoPanoptic, LoadedImage, segment_histogram
from panoptic_jax.evaluation.segment_stats import (NO_CROWD, VOID, PanopticQualityAccumulator, SegmentHistogram,
                                                  batch_stats)

MAX_SEGMENTS_LIMIT = 2048


class EvaluationError(UserError, ValueError):
  """The two sides cannot be evaluated together; the message names the image, category or file."""


def _check_same_size(name: str, gt_shape: tuple, pred_shape: tuple) -> None:
  if gt_shape != pred_shape or len(gt_shape) != 2:
    raise EvaluationError(f"{name}: ground truth is {gt_shape[0]}x{gt_shape[1]} but the prediction is "
                          f"{'x'.join(map(str, pred_shape))}; they must have the same size")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


class Evaluator:
  """Accumulates PQ (panopticapi semantics), mIoU and, when every image comes with scores, AP^Th_pan.

  Args:
    names: category names (canonical index order).
    is_thing: per category.
    label_divisor: of the canonical maps given to `add`.
    batch_size: images per jitted call (the batch is padded with all-VOID images); each call has a fixed host cost
      (dispatch, transfer, accumulation) that larger batches share.
    max_segments: initial static slots per image; doubled automatically when an image has more.
    mixed_fraction: initial `panoptic_stats` mixed_fraction; doubled automatically (up to 1) when an image needs more.
    pad_multiple: images are padded to multiples of this (fewer distinct jit shapes).
    shard: split each batch over the local devices (when batch_size divides evenly).
  """

  def __init__(self, names: Sequence[str], is_thing: Sequence[bool], label_divisor: int, batch_size: int = 16,
               max_segments: int = 128, pad_multiple: int = 64, shard: bool = True, mixed_fraction: float = 0.25):
    self.names = list(names)
    self.is_thing = np.asarray(is_thing, bool)
    self.label_divisor = int(label_divisor)
    self.batch_size = batch_size
    self.max_segments = max_segments
    self.mixed_fraction = mixed_fraction
    self.pad_multiple = pad_multiple
    self.pq = PanopticQualityAccumulator(self.names, list(self.is_thing))
    self.confusion = np.zeros((len(self.names), len(self.names) + 1), np.int64)
    self.ap = instance_lib.InstanceAPAccumulator(self.names)
    self.ap_missing: list[str] = []  # Images added without scores.
    self._pending: list[tuple] = []  # (name, gt, pred, crowd) for the jitted metric.
    self._pending_histograms: list[tuple] = []  # (name, SegmentHistogram) for the host.
    self._shard = shard

  def add(self, gt: np.ndarray, pred: np.ndarray, gt_crowd: np.ndarray | None = None,
          scores: Mapping[int, float] | None = None, name: str | None = None,
          extra_fn: Mapping[int, int] | None = None, in_range: bool = False) -> None:
    """Adds one image.

    Args:
      gt, pred: int32 [H, W] canonical maps (same shape, same categories and label divisor).
      gt_crowd: optional int32 [H, W] crowd map (see panoptic_quality).
      scores: predicted canonical value -> score for the thing segments (enables AP), or None.
      name: for error messages.
      extra_fn: category index -> false negatives to add (GT segments listed but absent from the map).
      in_range: the caller guarantees every value is VOID or a valid canonical value (this module's readers build
        the maps from checked tables), so the two passes over each map that check it are skipped.
    """
    name = self._name(name)
    gt, pred = np.asarray(gt, np.int32), np.asarray(pred, np.int32)
    _check_same_size(name, gt.shape, pred.shape)
    if gt_crowd is not None and gt_crowd.shape != gt.shape:
      raise EvaluationError(f"{name}: crowd map shape {gt_crowd.shape} differs from the GT map {gt.shape}")
    if gt_crowd is not None and np.all(gt_crowd == NO_CROWD):
      gt_crowd = None  # A batch without crowd maps skips reading one (panoptic_stats with gt_crowd=None).
    c = len(self.names)
    for side, m in (("ground truth", gt), ("prediction", pred)) if not in_range else ():
      if m.size and (m.min() < VOID or m.max() >= c * self.label_divisor):
        raise EvaluationError(f"{name}: the {side} holds values outside VOID and 0..{c * self.label_divisor - 1} "
                              f"({c} categories x label_divisor {self.label_divisor})")
    self._add_extra_fn(extra_fn)
    if scores is None:
      self.ap_missing.append(name)
    elif not self.ap_missing:
      self.ap.add_image(instance_lib.thing_instances(SegmentHistogram.of_maps(gt, gt_crowd, pred), scores,
                                                     self.is_thing, self.label_divisor))
    self._pending.append((name, gt, pred, gt_crowd))
    if len(self._pending) == self.batch_size:
      self.flush()

  def add_histogram(self, histogram: SegmentHistogram, scores: Mapping[int, float] | None = None,
                    name: str | None = None, extra_fn: Mapping[int, int] | None = None) -> None:
    """Adds one image given as its segment histogram (`add`'s statistics, reduced on the host in numpy).

    Args:
      histogram: canonical values in this evaluator's categories and label divisor (not checked).
      scores, name, extra_fn: as for `add`.
    """
    name = self._name(name)
    self._add_extra_fn(extra_fn)
    if scores is None:
      self.ap_missing.append(name)
    elif not self.ap_missing:
      self.ap.add_image(instance_lib.thing_instances(histogram, scores, self.is_thing, self.label_divisor))
    self._pending_histograms.append((name, histogram))
    if len(self._pending_histograms) == self.batch_size:
      self._flush_histograms()

  def _name(self, name: str | None) -> str:
    pending = len(self._pending) + len(self._pending_histograms)
    return name if name is not None else f"image {self.pq.num_images + pending}"

  def _add_extra_fn(self, extra_fn: Mapping[int, int] | None) -> None:
    for k, n in (extra_fn or {}).items():
      self.pq.fn[k] += n

  def _flush_histograms(self) -> None:
    items, self._pending_histograms = self._pending_histograms, []
    stats = batch_stats([h for _, h in items], num_categories=len(self.names), label_divisor=self.label_divisor)
    self.pq.update(stats, [n for n, _ in items])
    self.confusion += stats["confusion"].sum(axis=0)

  def flush(self) -> None:
    """Runs the pending images."""
    if self._pending_histograms:
      self._flush_histograms()
    if self._pending:
      self._flush_maps()

  @functools.cached_property
  def _sharding(self):
    """The maps' batches split over the local devices, or None (one device, or a batch that does not divide)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    if self._shard and len(devices) > 1 and self.batch_size % len(devices) == 0:
      return NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
    return None

  def _flush_maps(self) -> None:
    # JAX only here: images given as histograms (COCO files) are evaluated without it, a second less of start-up.
    import jax

    from panoptic_jax.evaluation.panoptic_quality import aligned_empty, panoptic_stats

    items, self._pending = self._pending, []
    h = _round_up(max(i[1].shape[0] for i in items), self.pad_multiple)
    w = _round_up(max(i[1].shape[1] for i in items), self.pad_multiple)
    b = self.batch_size
    # Aligned: device_put aliases them instead of copying (a copy costs more than the statistics). Each image is
    # copied in and only the rest is filled: filling whole buffers first would write every pixel twice.
    with_crowd = any(i[3] is not None for i in items)
    buffers = [(aligned_empty((b, h, w)), VOID, 1), (aligned_empty((b, h, w)), VOID, 2)]
    if with_crowd:
      buffers.append((aligned_empty((b, h, w)), NO_CROWD, 3))
    for buffer, fill, field in buffers:
      for k in range(b):
        image = items[k][field] if k < len(items) else None
        if image is None:
          buffer[k].fill(fill)
          continue
        ih, iw = image.shape
        buffer[k, :ih, :iw] = image
        buffer[k, ih:].fill(fill)
        buffer[k, :ih, iw:].fill(fill)
    gt, pred = buffers[0][0], buffers[1][0]
    crowd = buffers[2][0] if with_crowd else None
    names = [i[0] for i in items] + [f"padding {k}" for k in range(b - len(items))]
    valid = np.arange(b) < len(items)
    if self._sharding is not None:
      gt, pred, crowd = jax.device_put((gt, pred, crowd), self._sharding)
    while True:
      stats = panoptic_stats(gt, pred, crowd, num_categories=len(self.names), label_divisor=self.label_divisor,
                             max_segments=self.max_segments, with_confusion=True,
                             mixed_fraction=self.mixed_fraction)
      stats = jax.device_get(stats)
      if np.any(stats["num_mixed_blocks"] > stats["max_mixed_blocks"]):
        self.mixed_fraction = min(1.0, 2 * self.mixed_fraction)
        logging.info("PQ: an image has more mixed 8x8 tiles or 8-pixel rows than compiled for; recompiling with "
                     "mixed_fraction=%g", self.mixed_fraction)
        continue
      needed = int(max(stats["num_gt_slots"].max(), stats["num_pred_slots"].max()))
      if needed <= self.max_segments:
        break
      if needed > MAX_SEGMENTS_LIMIT:
        self.pq.update(stats, names)  # Raises SegmentOverflowError naming the image.
      self.max_segments = min(MAX_SEGMENTS_LIMIT, 1 << (needed - 1).bit_length())
      logging.info("PQ: an image has %d segments; recompiling with max_segments=%d", needed, self.max_segments)
    self.pq.update(stats, names, valid)
    self.confusion += stats["confusion"].sum(axis=0)

  def result(self) -> dict:
    """{"panoptic": PQ results, "semantic": mIoU results, "instance": AP results or {"computed": False, "reason"}}."""
    self.flush()
    out = {"panoptic": self.pq.result(), "semantic": semantic_lib.miou_from_confusion(self.confusion, self.names)}
    if self.ap_missing:
      shown = ", ".join(self.ap_missing[:3]) + (" ..." if len(self.ap_missing) > 3 else "")
      out["instance"] = {"computed": False,
                         "reason": f"AP not computed: no segment scores for {len(self.ap_missing)} images ({shown})"}
    else:
      out["instance"] = {"computed": True, **self.ap.result()}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Sides: the project's dataset format or COCO panoptic format.


@dataclasses.dataclass
class Side:
  """One side of an evaluation.

  Attributes:
    describe: where it comes from (for messages).
    names: image keys, in evaluation order.
    categories: category names in canonical order.
    is_thing: per category.
    label_divisor: of the maps `load` returns.
    coco: the COCO reader (COCO format) or None.
    dataset: the Dataset (project format) or None.
  """

  describe: str
  names: list[str]
  categories: list[str]
  is_thing: list[bool]
  label_divisor: int
  coco: CocoPanoptic | None = None
  dataset: object | None = None
  category_ids: list[int] | None = None  # COCO category ids in canonical order.
  positions: dict[str, int] | None = None  # Dataset example index of each name.
  segment_lists: dict[str, str] | None = None  # Dataset: name -> relative path of its segments/<stem>.json.

  @property
  def image_ids(self) -> dict:
    return dict(self.coco.image_ids) if self.coco is not None else {n: n for n in self.names}


def open_dataset_side(location: str, endpoint_url: str | None = None) -> Side:
  """A side in the project's format; its segment lists (segments/<stem>.json), if any, give the scores for AP."""
  from panoptic_jax.data import dataset_format as fmt  # Imported here: the data package is only needed for this side.
  from panoptic_jax.data.dataset import Dataset

  dataset = Dataset.open(location, endpoint_url, require_images=False)
  info = dataset.info
  lists = {}
  for file in dataset.storage.list_files(fmt.SEGMENTS):
    stem, ext = os.path.splitext(file)
    if ext.lower() == ".json":
      lists[stem] = f"{fmt.SEGMENTS}/{file}"
  return Side(f"dataset {location}", list(dataset.names), list(info.categories), list(info.is_thing),
              info.label_divisor, dataset=dataset, positions={n: i for i, n in enumerate(dataset.names)},
              segment_lists=lists)


def _dataset_scores(side: Side, key: str, panoptic: np.ndarray) -> dict[int, float] | None:
  """Canonical value (the side's own categories) -> score from the image's segment list, or None without one.

  Raises:
    EvaluationError: naming the file: malformed (and the field), or not listing exactly the map's segments.
  """
  from panoptic_jax.data import dataset_format as fmt

  relpath = side.segment_lists.get(key) if side.segment_lists else None
  if relpath is None:
    return None
  storage, info = side.dataset.storage, side.dataset.info
  where = storage.url(relpath)
  try:
    scores = fmt.decode_segments(storage.read_bytes(relpath), info, where).scores(info)
  except fmt.FormatError as e:
    raise EvaluationError(str(e)) from None
  present = {int(v) for v in np.unique(panoptic) if v != VOID}
  if present != scores.keys():

    def named(values):
      return ", ".join(f"{side.categories[v // side.label_divisor]} #{v % side.label_divisor}"
                       for v in sorted(values)[:10]) or "none"

    raise EvaluationError(f"{where}: segments: expected the {len(present)} segments of the map "
                          f"{storage.url(side.dataset.examples[side.positions[key]].annotation)}, found "
                          f"{len(scores)} listed (thing instances numbered 1..K by on-disk id); in the map but not "
                          f"listed: {named(present - scores.keys())}; listed but not in the map: "
                          f"{named(scores.keys() - present)}")
  return scores


def open_coco_side(json_path: str, folder: str | None, reference: CocoPanoptic | None = None) -> Side:
  """A COCO panoptic side; categories from its own JSON or, for predictions without categories, the reference's."""
  coco = CocoPanoptic.open(json_path, folder)
  categories = coco.categories or (reference.categories if reference is not None else [])
  if not categories:
    raise CocoFormatError(f"{json_path}: no 'categories' list; it is needed to name the categories")
  per_category = 1
  for ann in coco.annotations.values():
    counts = np.unique([s.get("category_id") for s in ann["segments_info"]], return_counts=True)[1]
    per_category = max(per_category, int(counts.max(initial=0)) + 1)
  label_divisor = max(1000, per_category)
  return Side(f"COCO panoptic {json_path}", list(coco.annotations), [c.name for c in categories],
              [c.isthing for c in categories], label_divisor, coco=coco, category_ids=[c.id for c in categories])


def pair_images(gt: Side, pred: Side) -> list[tuple[str, str]]:
  """(gt key, pred key) pairs: by image_id when both sides are COCO (as panopticapi), else by name."""
  if gt.coco is not None and pred.coco is not None:
    gt_ids, pred_ids = gt.image_ids, pred.image_ids
    by_id = {v: k for k, v in pred_ids.items()}
    pairs = [(k, by_id.get(v)) for k, v in gt_ids.items()]
    missing = [f"{k} (image_id {gt_ids[k]!r})" for k, p in pairs if p is None]
    extra = sorted(str(pred_ids[k]) for k in set(pred_ids) - {p for _, p in pairs})
  else:
    pred_names = set(pred.names)
    pairs = [(k, k if k in pred_names else None) for k in gt.names]
    missing = [k for k, p in pairs if p is None]
    extra = sorted(pred_names - set(gt.names))
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"{len(missing)} GT images have no prediction: {', '.join(missing[:10])}"
                   + (" ..." if len(missing) > 10 else ""))
    if extra:
      parts.append(f"{len(extra)} predictions have no GT image: {', '.join(extra[:10])}"
                   + (" ..." if len(extra) > 10 else ""))
    raise EvaluationError(f"the image sets differ ({gt.describe} vs {pred.describe}): " + "; ".join(parts))
  return pairs


def _category_mapping(gt: Side, pred: Side) -> np.ndarray:
  """pred category index -> GT category index (COCO vs COCO: by category id, as panopticapi; else by name).

  Unknown predicted categories map to -1 (an error if they occur in a prediction)."""
  if gt.coco is not None and pred.coco is not None:
    gt_index = {cid: k for k, cid in enumerate(gt.category_ids)}
    return np.array([gt_index.get(cid, -1) for cid in pred.category_ids], np.int64)
  gt_index = {name: k for k, name in enumerate(gt.categories)}
  return np.array([gt_index.get(name, -1) for name in pred.categories], np.int64)


def _load(side: Side, key: str, is_gt: bool, gt_side: Side, mapping: np.ndarray | None):
  """One image of a side in GT indexing and divisor: (COCO: a LoadedImage, else (panoptic, None)), scores or None,
  extra_fn."""
  if side.coco is not None:
    if is_gt or mapping is None:
      index = {cid: k for k, cid in enumerate(side.category_ids)}
    else:  # COCO category id -> GT index.
      index = {cid: int(mapping[k]) for k, cid in enumerate(side.category_ids) if mapping[k] >= 0}
      names = {cid: side.categories[k] for k, cid in enumerate(side.category_ids)}
      for seg in side.coco.annotations[key]["segments_info"]:
        cid = seg.get("category_id")
        if cid not in index:
          what = f"{names[cid]!r} (id {cid})" if cid in names else f"id {cid}"
          raise EvaluationError(f"{side.describe}: image {key}: predicted category {what} is not a GT category")
    loaded = side.coco.load(key, index, gt_side.label_divisor, is_gt)
    scores = loaded.scores
    thing_values = [v for v, k, crowd in loaded.segments if v is not None and gt_side.is_thing[k]]
    has_scores = bool(loaded.scores) and all(v in loaded.scores for v in thing_values)
    return loaded, (scores if has_scores else None), loaded.missing_fn
  dataset = side.dataset
  panoptic = dataset.read_panoptic(side.positions[key])
  scores = None if is_gt else _dataset_scores(side, key, panoptic)
  if mapping is not None:
    valid = panoptic >= 0
    category = np.where(valid, panoptic // side.label_divisor, 0)
    instance = np.where(valid, panoptic % side.label_divisor, 0)
    bad = np.unique(category[valid & (mapping[category] < 0)])
    if bad.size:
      raise EvaluationError(f"{side.describe}: image {key}: predicted categories "
                            f"{[side.categories[k] for k in bad]} are not GT categories")
    if instance.max(initial=0) >= gt_side.label_divisor:
      raise EvaluationError(f"{side.describe}: image {key}: instance id {instance.max()} does not fit the GT "
                            f"label_divisor {gt_side.label_divisor}")
    panoptic = np.where(valid, mapping[category] * gt_side.label_divisor + instance, VOID).astype(np.int32)
    if scores is not None:  # Every listed category is in the map, hence (checked above) a GT category.
      scores = {int(mapping[v // side.label_divisor]) * gt_side.label_divisor + v % side.label_divisor: score
                for v, score in scores.items()}
  return (panoptic, None), scores, {}


# Pairs per task of a worker process: the task's round trip (pickling the keys and the histograms) stays small.
_CHUNK = 32


def _map_in_order(fn, items: list, num_workers: int):
  """Yields fn(item) for the items in order, computed in `num_workers` threads or, where forking is safe, in one
  worker process per core (at most num_workers).

  pyspng decodes holding the GIL, so threads scale poorly (in one process, 1,500 COCO-like pairs took 4.5 s in four
  threads and 3.4 s in two processes). Forking is safe on Linux when this process has not loaded JAX, whose threads
  a fork could leave holding locks: the COCO against COCO command; label maps and callers with JAX use threads.
  """
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  processes = min(num_workers, cores)
  if processes > 1 and sys.platform == "linux" and "jax" not in sys.modules:
    chunks = [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]
    with multiprocessing.get_context("fork").Pool(processes, _start_worker, (fn,)) as pool:
      for results in pool.imap(_run_chunk, chunks):
        yield from results
    return
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    yield from pool.map(fn, items)


_worker_fn = None  # In a worker process of `_map_in_order`: the function it applies (inherited by the fork).


def _start_worker(fn) -> None:
  global _worker_fn
  _worker_fn = fn


def _run_chunk(chunk: list) -> list:
  return [_worker_fn(item) for item in chunk]


def evaluate_sides(gt: Side, pred: Side, batch_size: int = 16, max_segments: int = 128, num_workers: int = 4,
                   progress: bool = True) -> dict:
  """Evaluates `pred` against `gt`: the result of `Evaluator.result()` plus "categories" and "num_images"."""
  pairs = pair_images(gt, pred)
  mapping = _category_mapping(gt, pred)
  evaluator = Evaluator(gt.categories, gt.is_thing, gt.label_divisor, batch_size=batch_size,
                        max_segments=max_segments)

  def load_pair(pair):
    """(GT key, a SegmentHistogram (COCO vs COCO: counted in this thread) or (GT, predicted, crowd) maps, scores,
    extra_fn)."""
    g_key, p_key = pair
    g, _, extra_fn = _load(gt, g_key, True, gt, None)
    p, scores, _ = _load(pred, p_key, False, gt, mapping)
    g_map, p_map = (x.entry if isinstance(x, LoadedImage) else x[0] for x in (g, p))
    _check_same_size(g_key, g_map.shape, p_map.shape)
    if isinstance(g, LoadedImage) and isinstance(p, LoadedImage):
      return g_key, segment_histogram(g, p), scores, extra_fn
    maps = tuple(x.panoptic if isinstance(x, LoadedImage) else x[0] for x in (g, p))
    return g_key, (*maps, g.crowd if isinstance(g, LoadedImage) else None), scores, extra_fn

  for i, (key, image, scores, extra_fn) in enumerate(_map_in_order(load_pair, pairs, num_workers)):
    if isinstance(image, SegmentHistogram):
      evaluator.add_histogram(image, scores=scores, name=key, extra_fn=extra_fn)
    else:
      evaluator.add(*image, scores=scores, name=key, extra_fn=extra_fn, in_range=True)
    if progress and (i + 1) % 100 == 0:
      logging.info("evaluated %d / %d images", i + 1, len(pairs))
  out = evaluator.result()
  out["num_images"] = len(pairs)
  out["categories"] = [{"index": k, "name": n, "isthing": bool(t)} for k, (n, t) in
                       enumerate(zip(gt.categories, gt.is_thing))]
  return out


def format_table(result: Mapping) -> str:
  """panopticapi-style text table: All / Things / Stuff, per category, mIoU and AP."""

  def pct(x):
    return "   n/a" if x is None else f"{100 * x:6.2f}"

  pq = result["panoptic"]
  lines = [f"{'':14s} |     PQ     SQ     RQ |    N", "-" * 44]
  for group in ("All", "Things", "Stuff"):
    g = pq[group]
    note = "  (no category with segments)" if g["n"] == 0 else ""
    lines.append(f"{group:14s} | {pct(g['pq'])} {pct(g['sq'])} {pct(g['rq'])} | {g['n']:4d}{note}")
  lines += ["", f"{'category':24s} {'th':>2s} |     PQ     SQ     RQ |     tp     fp     fn", "-" * 72]
  omitted = sum(1 for e in pq["per_category"].values() if not e["counted"])
  for name, e in pq["per_category"].items():
    if not e["counted"]:
      continue
    lines.append(f"{name[:24]:24s} {'T' if e['isthing'] else 'S':>2s} | {pct(e['pq'])} {pct(e['sq'])} "
                 f"{pct(e['rq'])} | {e['tp']:6d} {e['fp']:6d} {e['fn']:6d}")
  if omitted:
    lines.append(f"({omitted} categories with no segment on either side are not listed and not averaged)")
  sem = result["semantic"]
  lines += ["", f"mIoU {pct(sem['mIoU'])}  (mean over the {sem['n_classes_with_gt']} classes with GT pixels; over the "
            f"{sem['n_classes_with_union']} classes with a non-empty union: {pct(sem['mIoU_classes_with_union'])})"]
  inst = result["instance"]
  if inst.get("computed"):
    lines.append("AP^Th_pan " + "  ".join(f"{k} {pct(inst[k]) if inst[k] >= 0 else '   n/a'}"
                                          for k in instance_lib.STAT_NAMES[:6]))
  else:
    lines.append(inst["reason"])
  return "\n".join(lines)
