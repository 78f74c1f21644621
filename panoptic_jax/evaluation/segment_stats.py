"""One image as the joint pixel histogram of its GT and predicted segments: all that PQ, mIoU and AP read.

How many pixels each (GT segment, predicted segment) pair shares decides every statistic of the official tools:
areas are its row and column sums, IoUs and the VOID / crowd overlaps are its cells, the confusion matrix is it summed
by category. Two paths build histograms and both reduce them with `histogram_stats`:
  * from label maps, on the device (`panoptic_quality.panoptic_stats`, jitted, xp = jax.numpy);
  * from decoded COCO PNGs, on the host (`coco_format.segment_histogram`, xp = numpy), where the PNGs' segment
    ids index small tables directly, so no full-size canonical map is ever built.

Slot keys (`gt_keys`, `pred_keys`) encode what a slot is: a segment `category * label_divisor + instance`, a crowd
region of category k, UNLISTED or VOID. This module imports numpy only: the host path needs no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

VOID = -1
UNLISTED = -2
NO_CROWD = -1

__all__ = ["VOID", "UNLISTED", "NO_CROWD", "gt_keys", "pred_keys", "histogram_stats", "SegmentHistogram",
           "batch_stats", "pq_from_counts", "PanopticQualityAccumulator", "SegmentOverflowError",
           "MixedBlockOverflowError"]


def gt_keys(xp, gt, crowd, num_categories: int, key_divisor: int):
  """GT keys of canonical values (any shape; xp is numpy or jax.numpy), and the key range.

  Keys: segments [0, C*div), crowd of category k: C*div + k, UNLISTED: C*div + C, VOID: C*div + C + 1; the range
  C*div + C + 2 is the padding key, which counts nowhere.
  """
  c, seg_range = num_categories, num_categories * key_divisor
  void_key, unlisted_key = seg_range + c + 1, seg_range + c
  key = xp.where(gt >= 0, xp.minimum(gt, seg_range - 1), void_key)
  if crowd is not None:
    key = xp.where(crowd >= 0, seg_range + xp.minimum(crowd, c - 1), xp.where(crowd == NO_CROWD, key, unlisted_key))
  return key, void_key + 1


def pred_keys(xp, pred, num_categories: int, key_divisor: int):
  """Predicted keys of canonical values: segments [0, C*div), VOID: C*div; the range C*div + 1 pads."""
  seg_range = num_categories * key_divisor
  return xp.where(pred >= 0, xp.minimum(pred, seg_range - 1), seg_range), seg_range + 1


def _scatter_add(xp, index, weights, size: int):
  """[size] sums of `weights` at `index` (same shapes): numpy's bincount or a jax.numpy scatter-add."""
  if xp is np:
    return np.bincount(index.ravel(), weights.ravel(), minlength=size).astype(np.int64)
  return xp.zeros(size, weights.dtype).at[index.ravel()].add(weights.ravel())


def histogram_stats(xp, joint, gt_key, pred_key, *, num_categories: int, key_divisor: int,
                    with_confusion: bool) -> dict:
  """panopticapi's per-image statistics (and the confusion matrix) from joint histograms.

  Per image: a GT and a predicted segment match when they have the same category, the GT is not crowd and
  2 * intersection > union with `union = pred_area + gt_area - intersection - |pred n GT VOID|`; FN = unmatched
  non-crowd GT segment; FP = unmatched predicted segment unless `2 (|pred n GT VOID| + |pred n crowd of its
  category|) > pred_area`. All in integers.

  Args:
    xp: numpy or jax.numpy.
    joint: int [B, G, P] pixels shared by GT slot g and predicted slot p (zero rows / columns for unused slots).
    gt_key: int [B, G] the GT slots' keys (`gt_keys`; the padding key for unused slots). Segment keys are distinct;
      VOID, UNLISTED and crowd keys may repeat.
    pred_key: int [B, P] the predicted slots' keys (`pred_keys`), segment keys distinct.
    num_categories, key_divisor: C and the keys' divisor.
    with_confusion: also the semantic confusion matrix.

  Returns:
    dict, per image: tp, fp, fn [B, C]; per GT slot, match_category (or -1), match_intersection, match_union
    [B, G]; with_confusion: confusion [B, C, C + 1] (GT category rows, crowd counted as its category, VOID and
    UNLISTED excluded; column C = predicted VOID).
  """
  c, div = num_categories, key_divisor
  seg_range = c * div
  gt_void_key = seg_range + c + 1
  g_is_seg = gt_key < seg_range
  g_is_crowd = (gt_key >= seg_range) & (gt_key < seg_range + c)
  g_is_void = gt_key == gt_void_key
  g_cat = xp.where(g_is_seg, gt_key // div, xp.where(g_is_crowd, gt_key - seg_range, -1))
  p_is_seg = pred_key < seg_range
  p_cat = xp.where(p_is_seg, pred_key // div, -1)

  gt_area = joint.sum(axis=2)  # [B, G]
  pred_area = joint.sum(axis=1)  # [B, P]
  pred_void = xp.sum(xp.where(g_is_void[:, :, None], joint, 0), axis=1)  # |pred n GT VOID|
  same_cat = (g_cat[:, :, None] == p_cat[:, None, :]) & (p_cat[:, None, :] >= 0)
  pred_crowd = xp.sum(xp.where(same_cat & g_is_crowd[:, :, None], joint, 0), axis=1)  # |pred n crowd of its cat|

  union = pred_area[:, None, :] + gt_area[:, :, None] - joint - pred_void[:, None, :]
  match = same_cat & g_is_seg[:, :, None] & p_is_seg[:, None, :] & (2 * joint > union)
  gt_matched = match.any(axis=2)
  pred_matched = match.any(axis=1)
  images = xp.arange(joint.shape[0])[:, None]

  def per_category(flags, cats):  # [B, S] -> [B, C] counts of the flagged slots by category.
    index = xp.where(flags, cats, c) + (c + 1) * images
    return _scatter_add(xp, index, xp.ones_like(index), joint.shape[0] * (c + 1)).reshape(-1, c + 1)[:, :c]

  forgiven = 2 * (pred_void + pred_crowd) > pred_area
  out = {
      "tp": per_category(gt_matched, g_cat),
      "fp": per_category(p_is_seg & ~pred_matched & ~forgiven, p_cat),
      "fn": per_category(g_is_seg & ~gt_matched, g_cat),
      "match_category": xp.where(gt_matched, g_cat, -1),
      "match_intersection": xp.sum(xp.where(match, joint, 0), axis=2),
      "match_union": xp.sum(xp.where(match, union, 0), axis=2),
  }
  if with_confusion:
    g_sem = xp.where(g_is_seg | g_is_crowd, g_cat, c)  # Row C: excluded (VOID, UNLISTED, padding).
    p_sem = xp.where(p_is_seg, p_cat, c)  # Column C: predicted VOID (padding slots have empty columns).
    index = (images[:, :, None] * (c + 1) + g_sem[:, :, None]) * (c + 1) + p_sem[:, None, :]
    confusion = _scatter_add(xp, index, joint, joint.shape[0] * (c + 1) ** 2)
    out["confusion"] = confusion.reshape(-1, c + 1, c + 1)[:, :c]
  return out


@dataclasses.dataclass
class SegmentHistogram:
  """One image's segments and the pixels each (GT, predicted) pair of them shares.

  Attributes:
    joint: int64 [G, P] pixels of GT entry g and predicted entry p.
    gt_values: int32 [G] canonical value of each GT entry (VOID for void pixels; ignored where gt_crowd says crowd
      or UNLISTED).
    gt_crowd: int32 [G] NO_CROWD, a crowd region's category, or UNLISTED; None when no entry is crowd or UNLISTED.
    pred_values: int32 [P] canonical value of each predicted entry (VOID for void pixels).
  """

  joint: np.ndarray
  gt_values: np.ndarray
  gt_crowd: np.ndarray | None
  pred_values: np.ndarray

  @classmethod
  def of_maps(cls, gt: np.ndarray, gt_crowd: np.ndarray | None, pred: np.ndarray) -> "SegmentHistogram":
    """The histogram of canonical [H, W] maps (crowd map as in `panoptic_quality`, or None)."""
    gt, pred = np.asarray(gt, np.int64).ravel(), np.asarray(pred, np.int64).ravel()
    if gt_crowd is not None:
      crowd = np.asarray(gt_crowd, np.int64).ravel()
      # Crowd and UNLISTED pixels are told apart from segments by an offset beyond every canonical value.
      offset = max(int(gt.max(initial=0)), 0) + 3
      gt = np.where(crowd == NO_CROWD, gt, offset + crowd)
    gt_ids, gt_index = np.unique(gt, return_inverse=True)
    pred_values, pred_index = np.unique(pred, return_inverse=True)
    joint = np.bincount(gt_index * len(pred_values) + pred_index, minlength=len(gt_ids) * len(pred_values))
    gt_values, crowd_values = gt_ids, None
    if gt_crowd is not None:
      is_crowd = gt_ids >= offset + UNLISTED
      crowd_values = np.where(is_crowd, gt_ids - offset, NO_CROWD).astype(np.int32)
      gt_values = np.where(is_crowd, VOID, gt_ids)
    return cls(joint.reshape(len(gt_ids), len(pred_values)), gt_values.astype(np.int32), crowd_values,
               pred_values.astype(np.int32))


def batch_stats(histograms: Sequence[SegmentHistogram], *, num_categories: int, label_divisor: int) -> dict:
  """`histogram_stats` of a batch of histograms on the host, padded to common slot counts.

  Returns the same dict as `panoptic_quality.panoptic_stats` (with confusion), slot counts included, so that
  `PanopticQualityAccumulator.update` takes it; numpy int64 arrays.
  """
  c, div = num_categories, label_divisor
  b = len(histograms)
  s = max(max(h.joint.shape) for h in histograms)  # As many slots per side (the accumulator's convention).
  joint = np.zeros((b, s, s), np.int64)
  gt_key = np.empty((b, s), np.int64)
  pred_key = np.empty((b, s), np.int64)
  for i, h in enumerate(histograms):
    gi, pi = h.joint.shape
    joint[i, :gi, :pi] = h.joint
    gt_key[i, :gi], gt_key[i, gi:] = gt_keys(np, h.gt_values, h.gt_crowd, c, div)  # The keys, then padding.
    pred_key[i, :pi], pred_key[i, pi:] = pred_keys(np, h.pred_values, c, div)
  out = histogram_stats(np, joint, gt_key, pred_key, num_categories=c, key_divisor=div, with_confusion=True)
  sizes = np.array([h.joint.shape for h in histograms], np.int64).reshape(b, 2)
  zeros = np.zeros((b, 2), np.int64)
  return {**out, "num_gt_slots": sizes[:, 0], "num_pred_slots": sizes[:, 1], "num_mixed_blocks": zeros,
          "max_mixed_blocks": zeros}


class SegmentOverflowError(ValueError):
  """An image has more segments than the static `max_segments` of the jitted metric."""


class MixedBlockOverflowError(ValueError):
  """An image has more mixed tiles or rows than the static `mixed_fraction` of the jitted metric allows."""


# ----------------------------------------------------------------------------------------------------------------------
# Host side: exact float64 reduction.


def pq_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, iou_sum: np.ndarray, is_thing: Sequence[bool],
                   names: Sequence[str]) -> dict:
  """panopticapi's `PQStat.pq_average` for All / Things / Stuff plus per-category values.

  Categories with tp + fp + fn == 0 are left out of the means (and reported with `counted: False`). A group with no
  counted category reports `n = 0` and None for pq, sq, rq.
  """
  tp, fp, fn = (np.asarray(a, np.int64) for a in (tp, fp, fn))
  iou_sum = np.asarray(iou_sum, np.float64)
  per_category = {}
  for k, name in enumerate(names):
    t, f_p, f_n, iou = int(tp[k]), int(fp[k]), int(fn[k]), float(iou_sum[k])
    entry = {"index": k, "isthing": bool(is_thing[k]), "tp": t, "fp": f_p, "fn": f_n, "iou_sum": iou}
    if t + f_p + f_n == 0:
      entry.update(pq=None, sq=None, rq=None, counted=False)
    else:
      denominator = t + 0.5 * f_p + 0.5 * f_n
      entry.update(pq=iou / denominator, sq=iou / t if t else 0.0, rq=t / denominator, counted=True)
    per_category[name] = entry
  groups = {}
  for group, want in (("All", None), ("Things", True), ("Stuff", False)):
    pq = sq = rq = 0.0
    n = 0
    for entry in per_category.values():
      if (want is not None and entry["isthing"] != want) or not entry["counted"]:
        continue
      n += 1
      pq += entry["pq"]
      sq += entry["sq"]
      rq += entry["rq"]
    groups[group] = ({"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n} if n else
                     {"pq": None, "sq": None, "rq": None, "n": 0})
  return {**groups, "per_category": per_category}


@dataclasses.dataclass
class PanopticQualityAccumulator:
  """Sums `panoptic_stats` outputs on the host; IoUs of matched pairs are divided and summed in float64.

  Feed it the (device-to-host gathered) outputs of each batch with `update`; `result()` gives panopticapi's numbers.
  """

  names: Sequence[str]
  is_thing: Sequence[bool]
  max_segments: int | None = None

  def __post_init__(self):
    c = len(self.names)
    self.tp = np.zeros(c, np.int64)
    self.fp = np.zeros(c, np.int64)
    self.fn = np.zeros(c, np.int64)
    self.iou_sum = np.zeros(c, np.float64)
    self.num_images = 0

  def update(self, stats: Mapping[str, np.ndarray], image_names: Sequence[str] | None = None,
             valid: np.ndarray | None = None) -> None:
    """Adds one batch.

    Args:
      stats: `panoptic_stats` output (device or numpy arrays).
      image_names: for error messages.
      valid: optional bool [B]; padding images (False) must have been given all-VOID maps (they add nothing) and
        are only left out of the image count.

    Raises:
      SegmentOverflowError: an image had more segments than max_segments.
      MixedBlockOverflowError: an image had more mixed tiles or rows than the compiled mixed_fraction allows.
    """
    stats = {k: np.asarray(v) for k, v in stats.items()}
    s = stats["match_category"].shape[1]
    mixed = np.flatnonzero(np.any(stats["num_mixed_blocks"] > stats["max_mixed_blocks"], axis=1))
    if mixed.size:
      i = int(mixed[0])
      who = image_names[i] if image_names is not None else f"batch element {i}"
      (tiles, rows), (max_tiles, max_rows) = stats["num_mixed_blocks"][i], stats["max_mixed_blocks"][i]
      raise MixedBlockOverflowError(
          f"{who}: {tiles} tiles of 8x8 pixels and {rows} rows of 8 pixels hold more than one (GT, predicted) value "
          f"pair; the metric was compiled for {max_tiles} and {max_rows}: raise mixed_fraction")
    for side in ("gt", "pred"):
      counts = stats[f"num_{side}_slots"]
      bad = np.flatnonzero(counts > s)
      if bad.size:
        i = int(bad[0])
        who = image_names[i] if image_names is not None else f"batch element {i}"
        raise SegmentOverflowError(
            f"{who}: the {'ground truth' if side == 'gt' else 'prediction'} has {int(counts[i])} segments "
            f"(GT slots include crowd regions, VOID and unlisted pixels); the metric was compiled for "
            f"max_segments={s}: raise max_segments")
    self.tp += stats["tp"].sum(axis=0)
    self.fp += stats["fp"].sum(axis=0)
    self.fn += stats["fn"].sum(axis=0)
    cats = stats["match_category"].ravel()
    matched = cats >= 0
    iou = stats["match_intersection"].ravel()[matched].astype(np.float64) / stats["match_union"].ravel()[matched]
    np.add.at(self.iou_sum, cats[matched], iou)
    self.num_images += int(np.sum(valid)) if valid is not None else stats["match_category"].shape[0]

  def merge(self, other: "PanopticQualityAccumulator") -> None:
    self.tp += other.tp
    self.fp += other.fp
    self.fn += other.fn
    self.iou_sum += other.iou_sum
    self.num_images += other.num_images

  def result(self) -> dict:
    out = pq_from_counts(self.tp, self.fp, self.fn, self.iou_sum, self.is_thing, self.names)
    out["num_images"] = self.num_images
    return out
