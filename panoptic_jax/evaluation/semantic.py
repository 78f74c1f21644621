"""Semantic segmentation on the host: a confusion matrix of category maps and mIoU, in both common conventions.

Confusion matrix [C, C + 1]: rows = GT category (ignored pixels excluded), columns = predicted category, column C =
predicted VOID / ignore (a miss for the GT class, never a class of its own). Per-class IoU = tp / (tp + fp + fn).

Conventions (docs/metrics.md):
  "classes_with_gt": mean over classes with GT pixels (detectron2 / Mask2Former);
  "classes_with_union": mean over classes with tp + fp + fn > 0 (Keras MeanIoU in DeepLab2, cityscapesScripts, mmseg).
They agree when every predicted class is present in the GT. `miou_from_confusion` reports both and says which is
the headline ("mIoU").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEADLINE_CONVENTION = "classes_with_gt"

__all__ = ["confusion_matrix", "semantic_from_panoptic", "miou_from_confusion", "HEADLINE_CONVENTION"]


def semantic_from_panoptic(panoptic: np.ndarray, label_divisor: int, crowd: np.ndarray | None = None) -> np.ndarray:
  """Canonical panoptic map -> category map with -1 for VOID; crowd regions (crowd map >= 0) take their category and
  UNLISTED crowd-map pixels (-2) become -1."""
  panoptic = np.asarray(panoptic)
  semantic = np.where(panoptic >= 0, panoptic // label_divisor, -1)
  if crowd is not None:
    semantic = np.where(crowd >= 0, crowd, np.where(crowd == -1, semantic, -1))
  return semantic


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, *, num_classes: int) -> np.ndarray:
  """Confusion matrix of category maps (any shape, e.g. [B, H, W]), summed over all pixels.

  The evaluator counts its own from segment histograms (`segment_stats.histogram_stats`); this one counts pixels
  directly, for an independent check.

  Args:
    gt: int GT categories 0..C-1; anything else (e.g. -1) is ignored.
    pred: int predicted categories 0..C-1, same shape; anything else counts as predicted VOID (column C).
    num_classes: C.

  Returns:
    int64 [C, C + 1].
  """
  c = num_classes
  gt = np.asarray(gt, np.int64).ravel()
  pred = np.asarray(pred, np.int64).ravel()
  valid = (gt >= 0) & (gt < c)
  pred = np.where((pred >= 0) & (pred < c), pred, c)
  return np.bincount(gt[valid] * (c + 1) + pred[valid], minlength=c * (c + 1)).reshape(c, c + 1)


def miou_from_confusion(confusion: np.ndarray, names: Sequence[str] | None = None) -> dict:
  """mIoU (both conventions), per-class IoU, pixel accuracy, from a [C, C + 1] confusion matrix, in float64.

  Returns:
    {"mIoU": headline value (convention `HEADLINE_CONVENTION`), "convention": its name, "mIoU_classes_with_gt",
     "mIoU_classes_with_union", "n_classes_with_gt", "n_classes_with_union", "pixel_accuracy",
     "per_class": {name: {"iou": float | None, "gt_pixels": int, "pred_pixels": int}}}.
    A mean over no class is None.
  """
  confusion = np.asarray(confusion, np.int64)
  c = confusion.shape[0]
  names = list(names) if names is not None else [str(k) for k in range(c)]
  tp = np.diag(confusion[:, :c])
  gt_pixels = confusion.sum(axis=1)
  pred_pixels = confusion[:, :c].sum(axis=0)
  union = gt_pixels + pred_pixels - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
  with_gt = gt_pixels > 0
  with_union = union > 0
  mean_gt = float(iou[with_gt].mean()) if with_gt.any() else None
  mean_union = float(iou[with_union].mean()) if with_union.any() else None
  total = int(gt_pixels.sum())
  return {
      "mIoU": mean_gt if HEADLINE_CONVENTION == "classes_with_gt" else mean_union,
      "convention": HEADLINE_CONVENTION,
      "mIoU_classes_with_gt": mean_gt,
      "mIoU_classes_with_union": mean_union,
      "n_classes_with_gt": int(with_gt.sum()),
      "n_classes_with_union": int(with_union.sum()),
      "pixel_accuracy": float(tp.sum() / total) if total else None,
      "per_class": {names[k]: {"iou": None if np.isnan(iou[k]) else float(iou[k]), "gt_pixels": int(gt_pixels[k]),
                               "pred_pixels": int(pred_pixels[k])} for k in range(c)},
  }
