"""Panoptic quality (PQ / SQ / RQ) with panopticapi's `pq_compute` semantics, on device, with static shapes.

Inputs are canonical panoptic maps (int32 `category * label_divisor + instance`, `VOID = -1`). Every distinct value
of a map is one segment (stuff included: the metric never merges segments itself). Crowd regions have no place in
the canonical map, so the ground truth comes with an optional second map:

  gt_crowd  int32 [B, H, W]: -1 = no crowd here (the GT map decides); c >= 0 = a crowd region of category c (the GT
            map value is ignored there); `UNLISTED` (-2) = a GT pixel that is neither VOID nor a segment nor a crowd
            region that forgives false positives (panopticapi: pixels of a segment missing from `segments_info`, and
            crowd segments of a category other than its last-listed one).

Per image, panopticapi's rules (reference/metrics.md):
  * a GT segment and a predicted segment match when they have the same category, the GT is not crowd and
    IoU > 0.5 (strictly), with `union = pred_area + gt_area - intersection - |pred n GT VOID|`;
  * FN = unmatched non-crowd GT segment;
  * FP = unmatched predicted segment unless `(|pred n GT VOID| + |pred n crowd of its category|) / pred_area > 0.5`.
All comparisons are done exactly in integers (`2 * intersection > union`).

Algorithm (no [H*W, S*S] one-hots, no sort): each side's values are compacted to at most `max_segments` slots per
image with a presence histogram over the value range and a rank table; one scatter-add of
`gt_slot * S + pred_slot` gives the joint histogram [S, S], from which areas, VOID and crowd overlaps and the
matching follow with small dense ops. GT crowd regions, VOID and UNLISTED pixels are GT slots too.

Outputs are integers with static shapes: per-category `tp`, `fp`, `fn` summed over the batch (under `jax.jit` with
the batch sharded over a mesh they are the global sums) and, per image and GT slot, the matched pair's category,
intersection and union, from which the host computes IoUs in float64 (`PanopticQualityAccumulator`), which is what
makes `iou_sum` equal to panopticapi's to ~1e-15.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

VOID = -1
UNLISTED = -2
NO_CROWD = -1

__all__ = ["VOID", "UNLISTED", "NO_CROWD", "panoptic_stats", "PanopticQualityAccumulator", "pq_from_counts",
           "SegmentOverflowError"]


class SegmentOverflowError(ValueError):
  """An image has more segments than the static `max_segments` of the jitted metric."""


def _compact(keys: jnp.ndarray, table_size: int, max_segments: int):
  """Maps each value of `keys` [B, N] (in [0, table_size)) to its rank among the image's distinct values.

  Returns:
    slot: int32 [B, N] in [0, max_segments) (values past the limit map to max_segments - 1; see `count`).
    present_keys: int32 [B, S] the distinct values in increasing order, padded with `table_size`.
    count: int32 [B] number of distinct values (> max_segments means overflow).
  """
  batch = keys.shape[0]
  offsets = (jnp.arange(batch, dtype=jnp.int32) * table_size)[:, None]
  hist = jnp.zeros(batch * table_size, jnp.int32).at[(keys + offsets).ravel()].add(
      1, mode="promise_in_bounds").reshape(batch, table_size)
  present = hist > 0
  count = present.sum(axis=1, dtype=jnp.int32)
  present_keys = jax.vmap(lambda m: jnp.nonzero(m, size=max_segments, fill_value=table_size)[0])(present)
  present_keys = present_keys.astype(jnp.int32)
  # Rank table: value -> slot. Padding entries (== table_size) land in an extra, never-read entry.
  ranks = jnp.broadcast_to(jnp.arange(max_segments, dtype=jnp.int32), (batch, max_segments))
  rank_table = jnp.full((batch, table_size + 1), max_segments - 1, jnp.int32)
  rank_table = rank_table.at[jnp.arange(batch)[:, None], present_keys].set(ranks)
  slot = jnp.take_along_axis(rank_table, keys, axis=1, mode="promise_in_bounds")
  return slot, present_keys, count


@functools.partial(jax.jit, static_argnames=("num_categories", "label_divisor", "max_segments", "with_confusion"))
def panoptic_stats(gt: jnp.ndarray, pred: jnp.ndarray, gt_crowd: jnp.ndarray | None = None, *, num_categories: int,
                   label_divisor: int, max_segments: int = 128, with_confusion: bool = False) -> dict:
  """Per-category PQ statistics of a batch.

  Args:
    gt: int32 [B, H, W] canonical GT panoptic maps (VOID = -1).
    pred: int32 [B, H, W] canonical predicted maps (VOID = -1), same categories and label divisor.
    gt_crowd: optional int32 [B, H, W] crowd map (-1 none, c >= 0 crowd of category c, -2 UNLISTED).
    num_categories: C; categories are 0..C-1.
    label_divisor: the maps' label divisor.
    max_segments: static number of slots per image and side. GT slots hold segments, crowd regions (one per
      category), VOID and UNLISTED; predicted slots hold segments and VOID.
    with_confusion: also return the semantic confusion matrix (see below).

  Returns:
    dict of int32 arrays:
      tp, fp, fn: [C] summed over the batch.
      match_category: [B, S] per GT slot, the category of its matched pair or -1.
      match_intersection, match_union: [B, S] the matched pair's intersection and union (0 when unmatched).
      num_gt_slots, num_pred_slots: [B] slots used; more than max_segments means the results of that image are
        invalid (`PanopticQualityAccumulator.update` raises).
      confusion (with_confusion): [C, C + 1] pixels of GT category (row; crowd regions count as their category,
        VOID and UNLISTED are excluded) predicted as category (column; column C = predicted VOID).
  """
  gt = jnp.asarray(gt, jnp.int32)
  pred = jnp.asarray(pred, jnp.int32)
  batch = gt.shape[0]
  gt = gt.reshape(batch, -1)
  pred = pred.reshape(batch, -1)
  crowd = None if gt_crowd is None else jnp.asarray(gt_crowd, jnp.int32).reshape(batch, -1)
  return _stats(gt, pred, crowd, num_categories=num_categories, key_divisor=label_divisor,
                max_segments=max_segments, with_confusion=with_confusion)


def _stats(gt, pred, crowd, *, num_categories: int, key_divisor: int, max_segments: int, with_confusion: bool):
  """panoptic_stats on [B, N] maps encoded `category * key_divisor + instance`."""
  c, div, s = num_categories, key_divisor, max_segments
  batch = gt.shape[0]
  seg_range = c * div
  # GT keys: segments [0, C*div), crowd of category k: C*div + k, UNLISTED: C*div + C, VOID: C*div + C + 1.
  gt_void_key, gt_unlisted_key = seg_range + c + 1, seg_range + c
  gt_key = jnp.where(gt >= 0, jnp.minimum(gt, seg_range - 1), gt_void_key)
  if crowd is not None:
    gt_key = jnp.where(crowd >= 0, seg_range + jnp.minimum(crowd, c - 1),
                       jnp.where(crowd == NO_CROWD, gt_key, gt_unlisted_key))
  # Predicted keys: segments [0, C*div), VOID: C*div.
  pred_void_key = seg_range
  pred_key = jnp.where(pred >= 0, jnp.minimum(pred, seg_range - 1), pred_void_key)

  gt_slot, gt_keys, num_gt = _compact(gt_key, seg_range + c + 2, s)
  pred_slot, pred_keys, num_pred = _compact(pred_key, seg_range + 1, s)

  offsets = (jnp.arange(batch, dtype=jnp.int32) * (s * s))[:, None]
  joint = jnp.zeros(batch * s * s, jnp.int32).at[(gt_slot * s + pred_slot + offsets).ravel()].add(
      1, mode="promise_in_bounds").reshape(batch, s, s)

  # Slot attributes [B, S].
  g_is_seg = gt_keys < seg_range
  g_is_crowd = (gt_keys >= seg_range) & (gt_keys < seg_range + c)
  g_is_void = gt_keys == gt_void_key
  g_cat = jnp.where(g_is_seg, gt_keys // div, jnp.where(g_is_crowd, gt_keys - seg_range, -1))
  p_is_seg = pred_keys < seg_range
  p_cat = jnp.where(p_is_seg, pred_keys // div, -1)

  gt_area = joint.sum(axis=2)  # [B, S]
  pred_area = joint.sum(axis=1)  # [B, S]
  pred_void = jnp.sum(jnp.where(g_is_void[:, :, None], joint, 0), axis=1)  # |pred n GT VOID|
  same_cat = (g_cat[:, :, None] == p_cat[:, None, :]) & (p_cat[:, None, :] >= 0)
  pred_crowd = jnp.sum(jnp.where(same_cat & g_is_crowd[:, :, None], joint, 0), axis=1)  # |pred n crowd of its cat|

  union = pred_area[:, None, :] + gt_area[:, :, None] - joint - pred_void[:, None, :]
  match = same_cat & g_is_seg[:, :, None] & p_is_seg[:, None, :] & (2 * joint > union)
  gt_matched = match.any(axis=2)
  pred_matched = match.any(axis=1)

  def per_category(flags, cats):
    index = jnp.where(flags, cats, c).ravel()
    return jnp.zeros(c + 1, jnp.int32).at[index].add(1)[:c]

  tp = per_category(gt_matched, g_cat)
  fn = per_category(g_is_seg & ~gt_matched, g_cat)
  forgiven = 2 * (pred_void + pred_crowd) > pred_area
  fp = per_category(p_is_seg & ~pred_matched & ~forgiven, p_cat)

  out = {
      "tp": tp, "fp": fp, "fn": fn,
      "match_category": jnp.where(gt_matched, g_cat, -1),
      "match_intersection": jnp.sum(jnp.where(match, joint, 0), axis=2),
      "match_union": jnp.sum(jnp.where(match, union, 0), axis=2),
      "num_gt_slots": num_gt, "num_pred_slots": num_pred,
  }
  if with_confusion:
    g_sem = jnp.where(g_is_seg | g_is_crowd, g_cat, c)  # Row C: excluded (VOID, UNLISTED, padding).
    p_sem = jnp.where(p_is_seg, p_cat, c)  # Column C: predicted VOID (padding slots have empty joint columns).
    index = (g_sem[:, :, None] * (c + 1) + p_sem[:, None, :]).ravel()
    conf = jnp.zeros((c + 1) * (c + 1), jnp.int32).at[index].add(joint.ravel()).reshape(c + 1, c + 1)
    out["confusion"] = conf[:c]
  return out


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
    """
    stats = {k: np.asarray(v) for k, v in stats.items()}
    s = stats["match_category"].shape[1]
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
    self.tp += stats["tp"]
    self.fp += stats["fp"]
    self.fn += stats["fn"]
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
