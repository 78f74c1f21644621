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

Algorithm (no [H*W, S*S] one-hots, no sort, no cumsum): pixels are taken in row-major blocks of 8; a block where
both maps are constant counts once with weight 8, the few "mixed" blocks (region boundaries) are gathered and counted
pixel by pixel. Each side's values are compacted to at most `max_segments` slots per image with a presence table
over the value range, ranked with blocked triangular matmuls (XLA CPU's cumsum is slow); one scatter-add of
`gt_slot * S + pred_slot` gives the joint histogram [S, S], from which areas, VOID and crowd overlaps and the
matching follow with small dense ops. GT crowd regions, VOID and UNLISTED pixels are GT slots too. Scatters and
gathers (serial on XLA CPU) touch N/8 + mixed_fraction * N entries per side instead of N.

Outputs are integers with static shapes: per-category `tp`, `fp`, `fn` summed over the batch (under `jax.jit` with
the batch sharded over a mesh they are the global sums) and, per image and GT slot, the matched pair's category,
intersection and union, from which the host computes IoUs in float64 (`PanopticQualityAccumulator`), which is what
makes `iou_sum` equal to panopticapi's to ~1e-15.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

VOID = -1
UNLISTED = -2
NO_CROWD = -1

__all__ = ["VOID", "UNLISTED", "NO_CROWD", "panoptic_stats", "PanopticQualityAccumulator", "pq_from_counts",
           "SegmentOverflowError", "MixedBlockOverflowError"]


# Pixels are counted in blocks of BLOCK consecutive values (row-major); see `_joint_histogram`.
BLOCK = 8


class SegmentOverflowError(ValueError):
  """An image has more segments than the static `max_segments` of the jitted metric."""


class MixedBlockOverflowError(ValueError):
  """An image has more mixed pixel blocks than the static `mixed_fraction` of the jitted metric allows."""


def _exclusive_cumsum(x: jnp.ndarray, width: int = 32) -> jnp.ndarray:
  """Exclusive prefix sum of a float32 vector [n] of small non-negative integers, with matmuls.

  XLA CPU lowers `cumsum` to a slow windowed reduction; a blocked triangular matmul is exact (float32 sums of
  integers below 2^24) and an order of magnitude faster.
  """
  n = x.shape[0]
  if n <= width:
    return x @ jnp.triu(jnp.ones((n, n), jnp.float32), 1)
  rows = -(-n // width)
  blocks = jnp.pad(x, (0, rows * width - n)).reshape(rows, width)
  within = blocks @ jnp.triu(jnp.ones((width, width), jnp.float32), 1)
  return (within + _exclusive_cumsum(blocks.sum(axis=1), width)[:, None]).reshape(-1)[:n]


def _slot_table(present: jnp.ndarray, max_segments: int):
  """Ranks the present values of a value table.

  Args:
    present: bool [T] values occurring in the image.
    max_segments: S.

  Returns:
    table: int32 [T + 1] value -> rank among present values (clipped to S - 1); entry T (padding) -> S.
    keys: int32 [S] the present values in increasing order, padded with T.
    count: int32 number of present values.
  """
  rank = _exclusive_cumsum(present.astype(jnp.float32)).astype(jnp.int32)
  inclusive = rank + present
  keys = jnp.searchsorted(inclusive, jnp.arange(max_segments, dtype=jnp.int32), side="right").astype(jnp.int32)
  table = jnp.concatenate([jnp.minimum(rank, max_segments - 1), jnp.array([max_segments], jnp.int32)])
  return table, keys, inclusive[-1]


def _joint_histogram(gt_key, pred_key, uniform, gt_size: int, pred_size: int, max_segments: int, block: int,
                     capacity: int):
  """Slots and the joint slot histogram of a batch.

  Pixels come in blocks of `block` consecutive values. A block where both maps are constant is counted once with
  weight `block`; the other ("mixed") blocks pixel by pixel, up to `capacity` of them (the caller reports more as an
  overflow). On maps made of regions this cuts the scatters and gathers, which XLA CPU runs serially, ~3x. Scatters
  and gathers index flat arrays (image offsets added) rather than being vmapped: XLA builds [n, 2] index arrays for
  batched ones.

  Args:
    gt_key, pred_key: int32 [B, N] (N a multiple of block) values in [0, size]; `size` marks padding (counted
      nowhere).
    uniform: bool [B, N / block] whether both maps are constant over the block (unused when block = 1).
    gt_size, pred_size: value table sizes.

  Returns:
    joint: int32 [B, S, S]; gt_keys, pred_keys: int32 [B, S]; num_gt, num_pred: int32 [B].
  """
  s = max_segments
  batch = gt_key.shape[0]
  image = jnp.arange(batch, dtype=jnp.int32)[:, None]
  gb, pb = gt_key.reshape(batch, -1, block), pred_key.reshape(batch, -1, block)
  # Parts: (gt values, predicted values, weights), [B, n] each; block representatives first, then the mixed pixels.
  parts = [(gb[:, :, 0], pb[:, :, 0], block if block == 1 else jnp.where(uniform, block, 0))]
  if block > 1:
    blocks = gb.shape[1]
    mixed = ~uniform
    position = jax.vmap(_exclusive_cumsum)(mixed.astype(jnp.float32)).astype(jnp.int32)
    target = jnp.where(mixed, position, capacity) + image * (capacity + 1)
    index = jnp.zeros(batch * (capacity + 1), jnp.int32).at[target.ravel()].set(
        jnp.tile(jnp.arange(blocks, dtype=jnp.int32), batch), mode="promise_in_bounds")
    index = index.reshape(batch, capacity + 1)[:, :capacity]
    used = (jnp.arange(capacity) < (position[:, -1] + mixed[:, -1])[:, None])[:, :, None]
    pixel = ((index + image * blocks) * block)[:, :, None] + jnp.arange(block, dtype=jnp.int32)
    parts.append((jnp.where(used, gt_key.ravel()[pixel], gt_size).reshape(batch, -1),
                  jnp.where(used, pred_key.ravel()[pixel], pred_size).reshape(batch, -1), 1))

  def slots(side, size):
    present = jnp.zeros(batch * (size + 1), jnp.bool_)
    for part in parts:
      present = present.at[(part[side] + image * (size + 1)).ravel()].set(True, mode="promise_in_bounds")
    table, keys, count = jax.vmap(functools.partial(_slot_table, max_segments=s))(
        present.reshape(batch, size + 1)[:, :size])
    table = table.ravel()
    return [table[part[side] + image * (size + 1)] for part in parts], keys, count

  g_slots, gt_keys, num_gt = slots(0, gt_size)
  p_slots, pred_keys, num_pred = slots(1, pred_size)
  joint = jnp.zeros(batch * (s + 1) * (s + 1), jnp.int32)
  for g, p, (_, _, weight) in zip(g_slots, p_slots, parts):
    weight = jnp.broadcast_to(weight, g.shape)
    joint = joint.at[(g * (s + 1) + p + image * (s + 1) ** 2).ravel()].add(weight.ravel(), mode="promise_in_bounds")
  joint = joint.reshape(batch, s + 1, s + 1)[:, :s, :s]
  return joint, gt_keys, pred_keys, num_gt, num_pred


def panoptic_stats(gt: jnp.ndarray, pred: jnp.ndarray, gt_crowd: jnp.ndarray | None = None, *, num_categories: int,
                   label_divisor: int, max_segments: int = 128, with_confusion: bool = False,
                   mixed_fraction: float = 0.25) -> dict:
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
    mixed_fraction: static share of the image's blocks of 8 consecutive pixels (row-major) in which the GT or the
      prediction changes value that the compiled metric can count (region maps: ~5-20%); 1 counts pixel by pixel
      (slower, never overflows).

  The work is jitted. When `gt` is a jax.Array whose batch dimension (only) is sharded over a mesh axis, each
  device counts its own images (`shard_map`; the per-category sums are `psum`-ed), because the flat scatters used
  here would otherwise make XLA gather the batch onto every device.

  Returns:
    dict of int32 arrays:
      tp, fp, fn: [C] summed over the batch.
      match_category: [B, S] per GT slot, the category of its matched pair or -1.
      match_intersection, match_union: [B, S] the matched pair's intersection and union (0 when unmatched).
      num_gt_slots, num_pred_slots: [B] slots used; more than max_segments means the results of that image are
        invalid (`PanopticQualityAccumulator.update` raises).
      num_mixed_blocks, max_mixed_blocks: [B] mixed blocks of the image and the compiled capacity; more than the
        capacity also means invalid results (raise mixed_fraction).
      confusion (with_confusion): [C, C + 1] pixels of GT category (row; crowd regions count as their category,
        VOID and UNLISTED are excluded) predicted as category (column; column C = predicted VOID).
  """
  mesh, axis = None, None
  sharding = getattr(gt, "sharding", None)
  if isinstance(sharding, NamedSharding) and len(sharding.spec) >= 1 and isinstance(sharding.spec[0], str) and all(
      a is None for a in sharding.spec[1:]) and gt.shape[0] % sharding.mesh.shape[sharding.spec[0]] == 0:
    mesh, axis = sharding.mesh, sharding.spec[0]
  return _panoptic_stats(gt, pred, gt_crowd, num_categories=num_categories, label_divisor=label_divisor,
                         max_segments=max_segments, with_confusion=with_confusion, mixed_fraction=mixed_fraction,
                         mesh=mesh, axis=axis)


@functools.partial(jax.jit, static_argnames=("num_categories", "label_divisor", "max_segments", "with_confusion",
                                             "mixed_fraction", "mesh", "axis"))
def _panoptic_stats(gt, pred, gt_crowd, *, num_categories, label_divisor, max_segments, with_confusion,
                    mixed_fraction, mesh, axis):
  """panoptic_stats, jitted; per device under shard_map when `mesh` is given."""
  gt = jnp.asarray(gt, jnp.int32)
  pred = jnp.asarray(pred, jnp.int32)
  crowd = None if gt_crowd is None else jnp.asarray(gt_crowd, jnp.int32)
  summed = ("tp", "fp", "fn", "confusion")

  def local(gt, pred, crowd):
    batch = gt.shape[0]
    out = _stats(gt.reshape(batch, -1), pred.reshape(batch, -1), None if crowd is None else crowd.reshape(batch, -1),
                 num_categories=num_categories, key_divisor=label_divisor, max_segments=max_segments,
                 with_confusion=with_confusion, mixed_fraction=mixed_fraction)
    return {k: jax.lax.psum(v, axis) if mesh is not None and k in summed else v for k, v in out.items()}

  if mesh is None:
    return local(gt, pred, crowd)
  keys = ["tp", "fp", "fn", "match_category", "match_intersection", "match_union", "num_gt_slots",
          "num_pred_slots", "num_mixed_blocks", "max_mixed_blocks"] + (["confusion"] if with_confusion else [])
  out_specs = {k: PartitionSpec() if k in summed else PartitionSpec(axis) for k in keys}
  return jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(axis), out_specs=out_specs)(gt, pred, crowd)


def _stats(gt, pred, crowd, *, num_categories: int, key_divisor: int, max_segments: int, with_confusion: bool,
           mixed_fraction: float):
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

  pixels = gt_key.shape[1]
  padded = -(-pixels // BLOCK) * BLOCK
  gt_key = jnp.pad(gt_key, ((0, 0), (0, padded - pixels)), constant_values=gt_void_key + 1)
  pred_key = jnp.pad(pred_key, ((0, 0), (0, padded - pixels)), constant_values=pred_void_key + 1)
  gb, pb = gt_key.reshape(batch, -1, BLOCK), pred_key.reshape(batch, -1, BLOCK)
  uniform = jnp.all((gb == gb[:, :, :1]) & (pb == pb[:, :, :1]), axis=2)  # [B, N / BLOCK]
  num_mixed = jnp.sum(~uniform, axis=1, dtype=jnp.int32)
  blocks = uniform.shape[1]
  capacity = min(blocks, max(1, math.ceil(blocks * mixed_fraction)))
  sizes = dict(gt_size=gt_void_key + 1, pred_size=pred_void_key + 1, max_segments=s)
  if mixed_fraction >= 1:  # Pixel by pixel: nothing can overflow.
    joint, gt_keys, pred_keys, num_gt, num_pred = _joint_histogram(gt_key, pred_key, uniform, block=1, capacity=0,
                                                                   **sizes)
  else:
    joint, gt_keys, pred_keys, num_gt, num_pred = _joint_histogram(gt_key, pred_key, uniform, block=BLOCK,
                                                                   capacity=capacity, **sizes)

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
      "num_mixed_blocks": num_mixed, "max_mixed_blocks": jnp.full(batch, capacity, jnp.int32),
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
      MixedBlockOverflowError: an image had more mixed blocks than the compiled mixed_fraction allows.
    """
    stats = {k: np.asarray(v) for k, v in stats.items()}
    s = stats["match_category"].shape[1]
    mixed = np.flatnonzero(stats["num_mixed_blocks"] > stats["max_mixed_blocks"])
    if mixed.size:
      i = int(mixed[0])
      who = image_names[i] if image_names is not None else f"batch element {i}"
      raise MixedBlockOverflowError(
          f"{who}: {int(stats['num_mixed_blocks'][i])} blocks of 8 pixels hold more than one GT or predicted value; "
          f"the metric was compiled for {int(stats['max_mixed_blocks'][i])}: raise mixed_fraction")
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
