"""Host-side resampling: scale a window of an image (and its label map), crop, pad; OpenCV or Pillow.

The one geometry of the training augmentation (`transforms.random_scale_crop_flip`), the evaluation and the
prediction commands (`resize_and_pad`: long side to the crop, aspect kept, padding bottom / right), in numpy with
OpenCV or Pillow and nothing else, so that the serving module (which runs without flax or grain) prepares images
exactly as the evaluation does.

Images resize bilinearly, labels by nearest neighbour with the same pixel-centre mapping (the source pixel
containing each output pixel's centre), so labels stay aligned with pixels. Backends: OpenCV (`cv2`, about 3x
cheaper) or Pillow (`pil`); "auto" takes OpenCV when it is installed. Labels do not depend on the backend; images
differ by rounding, and when shrinking Pillow averages (antialiases) where OpenCV interpolates like DeepLab2's TF
bilinear.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

VOID = -1  # dataset_format.VOID, the label of padding.
PAD_PIXEL = 128  # DeepLab2 pads with the mean pixel 127.5, i.e. 0 after the model's x / 127.5 - 1; 128 in uint8.
BACKENDS = ("auto", "cv2", "pil")
_CV2 = None  # The cv2 module once looked up, False when it is not installed.


def _sample_indices(origin: int, count: int, scale: float, size: int, reverse: bool = False) -> np.ndarray:
  """Nearest source index of output pixels 0..count-1 of a window starting at source pixel `origin`, scaled by
  `scale`: the source pixel that contains the output pixel's centre (the bilinear image's convention); clipped to
  0..size-1."""
  idx = origin + np.floor((np.arange(count) + 0.5) / scale).astype(np.int64)
  np.clip(idx, 0, size - 1, out=idx)
  return idx[::-1] if reverse else idx


def opencv():
  """OpenCV when installed (one thread: the pipeline parallelises over images), else None."""
  global _CV2
  if _CV2 is None:
    try:
      import cv2  # pylint: disable=g-import-not-at-top
      cv2.setNumThreads(1)
      _CV2 = cv2
    except ImportError:
      _CV2 = False
  return _CV2 or None


def resolve_backend(backend: str) -> str:
  """"auto" -> "cv2" when OpenCV is importable, else "pil"; "cv2" without OpenCV raises."""
  if backend not in BACKENDS:
    raise ValueError(f"resize backend: expected one of {BACKENDS}, found {backend!r}")
  if backend == "auto":
    return "cv2" if opencv() is not None else "pil"
  if backend == "cv2" and opencv() is None:
    raise ValueError("resize backend 'cv2' needs OpenCV: pip install opencv-python-headless (or use 'pil')")
  return backend


def recolor(image: np.ndarray, matrix: tuple[float, ...], backend: str) -> np.ndarray:
  if backend == "cv2":
    return opencv().transform(image, np.asarray(matrix, np.float32).reshape(3, 4))
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("RGB", matrix))


def _resample_cv2(window: np.ndarray, scaled_hw, out_hw, matrix, recolor_first: bool, flip: bool) -> np.ndarray:
  cv2 = opencv()
  (dh, dw), (out_h, out_w) = scaled_hw, out_hw
  if matrix is not None and recolor_first:
    window = recolor(window, matrix, "cv2")
  if (dh, dw) != window.shape[:2]:
    window = cv2.resize(window, (dw, dh), interpolation=cv2.INTER_LINEAR)
  window = window[:out_h, :out_w]
  if matrix is not None and not recolor_first:
    window = recolor(window, matrix, "cv2")
  return cv2.flip(window, 1) if flip else window


def _resample_pil(window: np.ndarray, scaled_hw, out_hw, matrix, recolor_first: bool, flip: bool) -> np.ndarray:
  (dh, dw), (out_h, out_w) = scaled_hw, out_hw
  wh, ww = window.shape[:2]
  image = Image.fromarray(np.ascontiguousarray(window))
  if matrix is not None and recolor_first:
    image = image.convert("RGB", matrix)
  if (dh, dw) != (wh, ww):  # Resample only the kept part of the scaled window.
    image = image.resize((out_w, out_h), Image.BILINEAR, box=(0, 0, out_w * ww / dw, out_h * wh / dh))
  elif (out_h, out_w) != (wh, ww):
    image = image.crop((0, 0, out_w, out_h))
  if matrix is not None and not recolor_first:
    image = image.convert("RGB", matrix)
  if flip:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(image)


def scale_crop(image: np.ndarray, panoptic: np.ndarray | None, scale: float, origin: tuple[int, int], crop_hw,
               flip: bool, pad_value: int, color_matrix=None, backend: str = "pil"
               ) -> tuple[np.ndarray, np.ndarray | None]:
  """Scales the source window starting at `origin` (source pixels) by `scale`, keeps its first crop_hw pixels,
  pads bottom / right to crop_hw, then flips the crop horizontally if asked (the padding moves to the left).

  Only the window is resampled. The window's scaled size is rounded to whole pixels, so the effective scales are
  dh / wh and dw / ww; labels are sampled with the same pixel-centre mapping. The colour matrix is applied to
  whichever of window and crop has fewer pixels. Returns uint8 [ch, cw, 3] and int32 [ch, cw] (None without a
  label map).
  """
  h, w = image.shape[:2]
  ch, cw = crop_hw
  r0, c0 = origin
  # The window: up to one source pixel past the crop's extent (bilinear support), or to the image's end.
  wh, ww = min(h - r0, math.ceil(ch / scale) + 1), min(w - c0, math.ceil(cw / scale) + 1)
  dh, dw = max(1, round(wh * scale)), max(1, round(ww * scale))
  out_h, out_w = min(ch, dh), min(cw, dw)
  recolor_first = color_matrix is not None and wh * ww < out_h * out_w
  resample = _resample_cv2 if backend == "cv2" else _resample_pil
  scaled = resample(image[r0:r0 + wh, c0:c0 + ww], (dh, dw), (out_h, out_w), color_matrix, recolor_first, flip)

  label = None
  if panoptic is not None:
    rows = _sample_indices(0, out_h, dh / wh, wh)
    cols = _sample_indices(0, out_w, dw / ww, ww, reverse=flip)
    label = panoptic[r0:r0 + wh, c0:c0 + ww].take(rows, axis=0).take(cols, axis=1)
  if (out_h, out_w) == (ch, cw):
    return (scaled.copy() if np.may_share_memory(scaled, image) else scaled), label
  # Padding goes bottom / right, and to the left after a flip (the flip mirrors the padded crop).
  px = cw - out_w if flip else 0
  out_image = np.full((ch, cw, 3), pad_value, np.uint8)
  out_image[:out_h, px:px + out_w] = scaled
  if label is None:
    return out_image, None
  out_label = np.full((ch, cw), VOID, np.int32)
  out_label[:out_h, px:px + out_w] = label
  return out_image, out_label


def resize_and_pad(image: np.ndarray, panoptic: np.ndarray | None, crop_hw: tuple[int, int], resize: bool = True,
                   pad_value: int = PAD_PIXEL, backend: str = "auto"
                   ) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
  """The eval and prediction geometry: scale to fit crop_hw (aspect kept; `resize=False` only pads), pad
  bottom / right.

  Args:
    image: uint8 [H, W, 3].
    panoptic: int32 [H, W] label map, or None (prediction).

  Returns:
    uint8 [ch, cw, 3], int32 [ch, cw] (None without a label map), and (content_h, content_w), the image's extent
    inside the padded crop.

  Raises:
    ValueError: with resize=False, for an image larger than the crop.
  """
  h, w = image.shape[:2]
  ch, cw = crop_hw
  if resize:
    scale = min(ch / h, cw / w)
  elif h > ch or w > cw:
    raise ValueError(f"image of {h}x{w} does not fit the eval crop {ch}x{cw}; resize to fit (config.input."
                     f"resize_to_crop) or enlarge the crop")
  else:
    scale = 1.0
  out_image, out_label = scale_crop(image, panoptic, scale, (0, 0), (ch, cw), False, pad_value,
                                    backend=resolve_backend(backend))
  return out_image, out_label, (min(ch, max(1, round(h * scale))), min(cw, max(1, round(w * scale))))
