"""AP^Th_pan: COCO mask AP on the thing segments of panoptic outputs (numpy, on the host).

An own implementation of pycocotools `COCOeval(iouType='segm')` (evaluateImg + accumulate + summarize) with its
defaults: IoU thresholds 0.50:0.05:0.95, 101 recall points, maxDets 1 / 10 / 100, areas all / small (<= 32^2) /
medium (32^2..96^2) / large (>= 96^2) with pycocotools' inclusive bounds. Crowd GT: IoU = intersection / detection
area, may be matched repeatedly, and its matches are ignored. Detections are ranked by score with a stable sort, so
ties keep the order in which images and segments were added (pycocotools: image ids ascending, then JSON order).

Ground truth = thing segments of the panoptic GT plus one crowd instance per category from the crowd map;
detections = thing segments of the predicted map with their scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from panoptic_jax.evaluation.segment_stats import NO_CROWD, SegmentHistogram

IOU_THRESHOLDS = np.linspace(.5, 0.95, int(np.round((0.95 - .5) / .05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(.0, 1.00, int(np.round((1.00 - .0) / .01)) + 1, endpoint=True)
MAX_DETS = (1, 10, 100)
AREA_RANGES = {"all": (0, 1e10), "small": (0, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e10)}
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

__all__ = ["InstanceAPAccumulator", "thing_instances", "STAT_NAMES"]


def thing_instances(histogram: SegmentHistogram, scores: Mapping[int, float], is_thing: np.ndarray,
                    label_divisor: int) -> dict:
  """Instances of one image, with their pairwise mask IoUs.

  Args:
    histogram: the image's segments and their overlaps (`SegmentHistogram`, e.g. `SegmentHistogram.of_maps`).
    scores: predicted canonical value -> score; every predicted thing segment needs one.
    is_thing: bool [C].
    label_divisor: of both sides' canonical values.

  Returns:
    {"gt_category", "gt_area", "gt_crowd": [G], "dt_category", "dt_area", "dt_score": [D], "iou": [D, G] float64}
    (IoU with a crowd GT = intersection / detection area).
  """
  is_thing = np.asarray(is_thing, bool)
  num_seg = len(is_thing) * label_divisor

  def thing_key(values):  # Thing segment values, else -1.
    values = np.asarray(values, np.int64)
    return np.where((values >= 0) & is_thing[np.clip(values, 0, num_seg - 1) // label_divisor], values, -1)

  gt_values = thing_key(histogram.gt_values)
  if histogram.gt_crowd is not None:
    crowd = np.asarray(histogram.gt_crowd, np.int64)
    crowd_key = np.where((crowd >= 0) & is_thing[np.maximum(crowd, 0)], num_seg + crowd, -1)
    gt_values = np.where(crowd == NO_CROWD, gt_values, crowd_key)
  dt_values = thing_key(histogram.pred_values)
  # The instances in increasing value (crowd regions last): the order ties are broken in.
  g_keep = np.flatnonzero(gt_values >= 0)
  g_keep = g_keep[np.argsort(gt_values[g_keep], kind="stable")]
  d_keep = np.flatnonzero(dt_values >= 0)
  d_keep = d_keep[np.argsort(dt_values[d_keep], kind="stable")]
  joint = histogram.joint
  gt_area = joint.sum(axis=1)[g_keep]
  dt_area = joint.sum(axis=0)[d_keep]
  inter = joint[g_keep][:, d_keep].T  # [D, G]
  gt_values, dt_values = gt_values[g_keep], dt_values[d_keep]
  is_crowd = gt_values >= num_seg
  gt_category = np.where(is_crowd, gt_values - num_seg, gt_values // label_divisor)
  missing = [int(v) for v in dt_values if int(v) not in scores]
  if missing:
    raise ValueError(f"predicted thing segments {missing[:10]} have no score")
  dt_score = np.array([scores[int(v)] for v in dt_values], np.float64)
  union = np.where(is_crowd[None, :], dt_area[:, None], dt_area[:, None] + gt_area[None, :] - inter)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
  return {"gt_category": gt_category, "gt_area": gt_area, "gt_crowd": is_crowd,
          "dt_category": dt_values // label_divisor, "dt_area": dt_area, "dt_score": dt_score, "iou": iou}


def _evaluate_image(iou: np.ndarray, gt_area: np.ndarray, gt_crowd: np.ndarray, dt_area: np.ndarray,
                    area_range: tuple[float, float]):
  """pycocotools evaluateImg for one (image, category, area range); detections already sorted and truncated.

  Returns:
    dt_matched bool [T, D], dt_ignore bool [T, D], gt_ignore bool [G].
  """
  lo, hi = area_range
  gt_ignore_raw = gt_crowd | (gt_area < lo) | (gt_area > hi)
  order = np.argsort(gt_ignore_raw, kind="mergesort")
  gt_ignore = gt_ignore_raw[order]
  crowd = gt_crowd[order]
  iou = iou[:, order]
  t_count, d_count, g_count = len(IOU_THRESHOLDS), iou.shape[0], iou.shape[1]
  dt_matched = np.zeros((t_count, d_count), bool)
  dt_ignore = np.zeros((t_count, d_count), bool)
  if d_count and g_count:
    for t, threshold in enumerate(IOU_THRESHOLDS):
      threshold = min(threshold, 1 - 1e-10)
      gt_taken = np.zeros(g_count, bool)
      for d in range(d_count):
        eligible = (iou[d] >= threshold) & (~gt_taken | crowd)
        candidates = eligible & ~gt_ignore
        if not candidates.any():
          candidates = eligible & gt_ignore
          if not candidates.any():
            continue
        values = np.where(candidates, iou[d], -np.inf)
        m = g_count - 1 - int(np.argmax(values[::-1]))  # The last of equal maxima, as pycocotools' `>=` scan.
        dt_ignore[t, d] = gt_ignore[m]
        dt_matched[t, d] = True
        gt_taken[m] = True
  out_of_range = (dt_area < lo) | (dt_area > hi)
  dt_ignore |= ~dt_matched & out_of_range[None, :]
  return dt_matched, dt_ignore, gt_ignore


class InstanceAPAccumulator:
  """Collects per-image thing instances; `result()` gives COCO's 12 numbers (AP, AP50, ... ARl)."""

  def __init__(self, names: Sequence[str] | None = None):
    self.names = names
    # (category, area index) -> list over images of (scores [D], matched [T, D], ignore [T, D], gt_ignore [G]).
    self._per_key: dict[tuple[int, int], list] = {}
    self.num_images = 0

  def add_image(self, instances: Mapping[str, np.ndarray]) -> None:
    """Adds one image (`thing_instances` output)."""
    self.num_images += 1
    gt_cat, dt_cat = np.asarray(instances["gt_category"]), np.asarray(instances["dt_category"])
    for k in np.union1d(gt_cat, dt_cat):
      g = np.flatnonzero(gt_cat == k)
      d = np.flatnonzero(dt_cat == k)
      scores = np.asarray(instances["dt_score"])[d]
      order = np.argsort(-scores, kind="mergesort")[:MAX_DETS[-1]]
      d = d[order]
      iou = np.asarray(instances["iou"])[np.ix_(d, g)]
      for a, area_range in enumerate(AREA_RANGES.values()):
        matched, ignore, gt_ignore = _evaluate_image(iou, np.asarray(instances["gt_area"])[g],
                                                     np.asarray(instances["gt_crowd"])[g].astype(bool),
                                                     np.asarray(instances["dt_area"])[d], area_range)
        self._per_key.setdefault((int(k), a), []).append((scores[order], matched, ignore, gt_ignore))

  def result(self) -> dict:
    """{"AP": ..., "AP50": ..., ..., "ARl": ...}; -1.0 where no category has GT (pycocotools' convention)."""
    t_count, r_count = len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS)
    categories = sorted({k for k, _ in self._per_key})
    precision = -np.ones((t_count, r_count, len(categories), len(AREA_RANGES), len(MAX_DETS)))
    recall = -np.ones((t_count, len(categories), len(AREA_RANGES), len(MAX_DETS)))
    for ki, k in enumerate(categories):
      for a in range(len(AREA_RANGES)):
        entries = self._per_key.get((k, a), [])
        if not entries:
          continue
        gt_ignore = np.concatenate([e[3] for e in entries])
        npig = int(np.count_nonzero(~gt_ignore))
        if npig == 0:
          continue
        for mi, max_det in enumerate(MAX_DETS):
          scores = np.concatenate([e[0][:max_det] for e in entries])
          order = np.argsort(-scores, kind="mergesort")
          matched = np.concatenate([e[1][:, :max_det] for e in entries], axis=1)[:, order]
          ignore = np.concatenate([e[2][:, :max_det] for e in entries], axis=1)[:, order]
          tps = np.cumsum(matched & ~ignore, axis=1).astype(float)
          fps = np.cumsum(~matched & ~ignore, axis=1).astype(float)
          for t in range(t_count):
            tp, fp = tps[t], fps[t]
            nd = len(tp)
            rc = tp / npig
            pr = tp / (fp + tp + np.spacing(1))
            recall[t, ki, a, mi] = rc[-1] if nd else 0
            pr = np.maximum.accumulate(pr[::-1])[::-1] if nd else pr
            inds = np.searchsorted(rc, RECALL_THRESHOLDS, side="left")
            q = np.zeros(r_count)
            valid = inds < nd
            q[valid] = pr[inds[valid]]
            precision[t, :, ki, a, mi] = q

    def summarize(ap: bool, iou: float | None = None, area: int = 0, max_det: int = 2) -> float:
      s = precision[..., area, max_det] if ap else recall[..., area, max_det]
      if iou is not None:
        s = s[np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou))[0]]
      s = s[s > -1]
      return float(np.mean(s)) if s.size else -1.0

    values = [summarize(True), summarize(True, .5), summarize(True, .75), summarize(True, area=1),
              summarize(True, area=2), summarize(True, area=3), summarize(False, max_det=0),
              summarize(False, max_det=1), summarize(False), summarize(False, area=1), summarize(False, area=2),
              summarize(False, area=3)]
    out = dict(zip(STAT_NAMES, values))
    out["num_images"] = self.num_images
    return out
