"""Semantic segmentation: a jitted confusion matrix and mIoU on the host, in both common conventions.

Confusion matrix [C, C + 1]: rows = GT category (ignored pixels excluded), columns = predicted category, column C =
predicted VOID / ignore (a miss for the GT class, never a class of its own). Per-class IoU = tp / (tp + fp + fn).

Conventions (docs/metrics.md):
  "classes_with_gt": mean over classes with GT pixels (detectron2 / Mask2Former);
  "classes_with_union": mean over classes with tp + fp + fn > 0 (Keras MeanIoU in DeepLab2, cityscapesScripts, mmseg).
They agree when every predicted class is present in the GT. `miou_from_confusion` reports both and says which is
the headline ("mIoU").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

HEADLINE_CONVENTION = "classes_with_gt"

__all__ = ["confusion_matrix", "semantic_from_panoptic", "miou_from_confusion", "HEADLINE_CONVENTION"]


def semantic_from_panoptic(panoptic: jnp.ndarray, label_divisor: int, crowd: jnp.ndarray | None = None) -> jnp.ndarray:
  """Canonical panoptic map -> category map with -1 for VOID; crowd regions (crowd map >= 0) take their category and
  UNLISTED crowd-map pixels (-2) become -1."""
  semantic = jnp.where(panoptic >= 0, panoptic // label_divisor, -1)
  if crowd is not None:
    semantic = jnp.where(crowd >= 0, crowd, jnp.where(crowd == -1, semantic, -1))
  return semantic


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(gt: jnp.ndarray, pred: jnp.ndarray, *, num_classes: int) -> jnp.ndarray:
  """Confusion matrix of a batch of category maps, summed over the batch.

  Args:
    gt: int [B, H, W] GT categories 0..C-1; anything else (e.g. -1) is ignored.
    pred: int [B, H, W] predicted categories 0..C-1; anything else counts as predicted VOID (column C).
    num_classes: C.

  Returns:
    int32 [C, C + 1].
  """
  c = num_classes
  gt = jnp.asarray(gt, jnp.int32).ravel()
  pred = jnp.asarray(pred, jnp.int32).ravel()
  valid = (gt >= 0) & (gt < c)
  pred = jnp.where((pred >= 0) & (pred < c), pred, c)
  index = jnp.where(valid, gt * (c + 1) + pred, c * (c + 1))  # Ignored pixels: one extra, dropped bin.
  hist = jnp.zeros(c * (c + 1) + 1, jnp.int32).at[index].add(1, mode="promise_in_bounds")
  return hist[:-1].reshape(c, c + 1)


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
