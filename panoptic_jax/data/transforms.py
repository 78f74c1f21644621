"""Host-side transforms: augmentation, eval resizing and kMaX mask-slot targets, in numpy with OpenCV or Pillow.

Every function takes and returns plain numpy arrays; randomness comes only from the `np.random.Generator` passed in
(Grain seeds it per element from the pipeline seed and the element's index, so a run is reproducible and resumable).

Element flow (dict keys):
  source      {"image": uint8 [H, W, 3], "panoptic": int32 [H, W], "name": str, "index": int}
  TrainTransform / EvalTransform ->
              {"image": uint8 [h, w, 3], "panoptic": int32 [h, w], "semantic": int32 [hs, ws],
               "slot_ids": int32 [hs, ws], "slot_classes": int32 [N], "dropped_segments": int32 [],
               "valid": bool [], "index": int32 []}  (+ "content_hw", "original_hw" int32 [2] from EvalTransform)
  `valid` is False for blanks: eval padding (index -1) and train samples that failed to decode.
where (h, w) is the crop size, hs = (h - 1) // stride + 1 (i.e. `label[::stride, ::stride]`; crops of the form
stride * k + 1 give exactly k + 1) and N the number of mask slots.

Geometry (train), following DeepLab2's input_preprocessing: an optional base resize that fits the image into the
crop, then a random scale s ~ U[min_scale, max_scale] (optionally quantised to scale_step), a random crop of the
scaled image (its origin drawn in whole source pixels), padding at the bottom/right when the scaled image is smaller
than the crop (image with PAD_PIXEL, labels with VOID), then a horizontal flip with probability flip_prob (the padding
flips with it). Only the source window under the crop is resampled, so upscaling costs the crop's pixels, never the
whole upscaled image. Images resize bilinearly, labels by nearest neighbour with the same pixel-centre mapping (the
source pixel containing each output pixel's centre), so labels stay aligned with pixels. Eval: resize so the image
fits the crop (long side to the crop, aspect kept; `resize=False` pads only) and pad bottom/right.

Backends (AugmentConfig.backend): OpenCV (`cv2`, about 3x cheaper for the whole train transform at 512x1024) or
Pillow (`pil`); "auto" takes OpenCV when it is installed. Labels do not depend on the backend; images differ by
rounding, and when shrinking Pillow averages (antialiases) where OpenCV interpolates like DeepLab2's TF bilinear.
Reproducibility (same seed, same batches) holds for one backend.

Photometric jitter (train): brightness, contrast, saturation and a hue rotation, composed into one 3x4 colour matrix
and applied in one call at whichever of source window / crop has fewer pixels. This jitter is our own option:
DeepLab2 has none.

AutoAugment (train, `AugmentConfig.autoaugment`, autoaugment.py): DeepLab2's photometric policy, the one its kMaX
recipes use ("simple_classification_policy" for COCO / ADE20K, "..._magnitude_scale_0.2" for Cityscapes), instead
of any colour jitter. DeepLab2 (input_preprocessing.preprocess_image_and_label) applies it after the random scale,
before padding, crop and flip, to the whole scaled image; here it applies to the crop's image content (never its
padding), after the geometry's draws, to the main crop and the copy-paste partner alike (as DeepLab2's
sample_generator does). Its per-pixel ops (Brightness, Color, Solarize, Posterize, Invert) and Contrast (whose
degenerate grey depends on the whole scaled image's pixel count, passed along) are the same on the crop; when the
scaled image is larger than the crop, Equalize's histogram (and AutoContrast's min / max) is the visible window's,
not the whole scaled image's, and Sharpness keeps the crop's 1-pixel frame unsmoothed. When both are on, the jitter
comes first (inside the resampling) and AutoAugment sees the jittered crop; DeepLab2's recipe is the jitter off
(brightness = contrast = saturation = hue = 0) and autoaugment on. Labels are never changed by either.

Mask-slot targets (kMaX-DeepLab, docs/kmax.md, section 5): computed on the label at the model output stride
(`panoptic[::stride, ::stride]`), so every slot has at least one pixel there. One slot per thing instance, one per
stuff class present (all pixels of a stuff class are one segment, whatever instance ids they carry). Slot order:
stuff slots first, by category id, then thing slots by (category id, instance id); unused slots have class -1 and no
pixels. When an image has more segments than slots, the smallest thing instances (by pixel count at the output
stride; stuff only if stuff alone overflows) are dropped: their pixels get slot id -1 (ignored by the mask losses,
their semantic label is kept) and the element's "dropped_segments" counts them. Nothing is logged here, per image
or per worker process: the count travels with the batch, and the training loop sums it over the global batch and
warns a few times per run (training/data_health.py). The matching in the loss makes the slot order irrelevant to
training; it is fixed only to make targets reproducible and easy to read.

Panoptic copy-paste (train, `AugmentConfig.copy_paste`; the authors' PyTorch port's `*_panoptic_lsj` dataset
mappers): the pipeline pairs each element with a "partner" drawn from the whole training set (seeded by the element's
position in the stream, so reproducible and resumable). The partner gets its own geometry and colour jitter with the
scale range halved, then every thing segment and a random subset of all its segments (shuffled, the first
U{0..n} kept) are pasted over the main crop, image and labels. Pasted stuff of a class the main crop has joins that
class's segment; pasted things are renumbered after the main crop's instances of their class. Only labelled pixels
are pasted (the partner's void and padding never are). Unlike the port, a crop that ends up (nearly) all void is not
redrawn: the losses see it as it is.

Undecodable samples (train): an element carrying "decode_error" (pipeline.py puts it there when the source could not
decode the image or annotation) becomes a blank crop: PAD_PIXEL image, all-void labels, no slots, `valid` False and
its "index" kept, so that the batch keeps its shape and the losses leave it out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import grain
import numpy as np

from panoptic_jax.data import autoaugment as autoaugment_lib
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.resampling import BACKENDS, PAD_PIXEL, recolor, resize_and_pad, resolve_backend, scale_crop

VOID = fmt.VOID

# BT.601 luma and the YIQ basis used for the hue rotation.
_LUMA = np.array([0.299, 0.587, 0.114])
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Augmentation settings (DeepLab2 / kMaX recipes: docs/kmax.md, section 7).

  Attributes:
    crop_size: (height, width) of every output crop; kMaX uses output_stride * k + 1 (e.g. 641, 1025x2049).
    min_scale, max_scale: range of the random scale factor.
    scale_step: quantise the scale to min_scale + k * scale_step (0: continuous).
    resize_to_crop: first scale the image to fit the crop (COCO recipe: long side to the crop), then the random
      scale on top.
    flip_prob: probability of a horizontal flip.
    brightness, contrast, saturation: factors drawn from U[1 - x, 1 + x] (0 disables).
    hue: rotation of the chroma plane drawn from U[-hue, hue] turns (0 disables; 0.5 is any hue).
    pad_value: image value for padding.
    backend: "cv2" (OpenCV), "pil" (Pillow), or "auto" (OpenCV when installed); see the module docstring.
    copy_paste: paste segments of a partner image over each crop (module docstring); the pipeline then reads a
      partner per element.
    autoaugment: DeepLab2's AutoAugment policy by name (a key of autoaugment.POLICIES), "" for none; applied to
      the crop's content after the geometry (module docstring). DeepLab2's kMaX recipes use it, not the jitter above.
  """

  crop_size: tuple[int, int] = (641, 641)
  min_scale: float = 0.5
  max_scale: float = 2.0
  scale_step: float = 0.0
  resize_to_crop: bool = False
  flip_prob: float = 0.5
  brightness: float = 0.2
  contrast: float = 0.2
  saturation: float = 0.2
  hue: float = 0.03
  pad_value: int = PAD_PIXEL
  backend: str = "auto"
  copy_paste: bool = False
  autoaugment: str = ""

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"backend: expected one of {BACKENDS}, found {self.backend!r}")
    if len(self.crop_size) != 2 or min(self.crop_size) < 1:
      raise ValueError(f"crop_size: expected (height, width) of positive integers, found {self.crop_size!r}")
    if not 0 < self.min_scale <= self.max_scale:
      raise ValueError(f"scale range: expected 0 < min_scale <= max_scale, found {self.min_scale}, {self.max_scale}")
    if not 0 <= self.flip_prob <= 1:
      raise ValueError(f"flip_prob: expected a probability in [0, 1], found {self.flip_prob}")
    for name in ("brightness", "contrast", "saturation"):
      if not 0 <= getattr(self, name) < 1:
        raise ValueError(f"{name}: expected a jitter strength in [0, 1), found {getattr(self, name)}")
    if not 0 <= self.hue <= 0.5:
      raise ValueError(f"hue: expected a rotation in [0, 0.5] turns, found {self.hue}")
    if self.autoaugment and self.autoaugment not in autoaugment_lib.POLICIES:
      raise ValueError(f"autoaugment: expected '' (off) or one of {sorted(autoaugment_lib.POLICIES)}, "
                       f"found {self.autoaugment!r}")


@dataclasses.dataclass(frozen=True)
class TargetConfig:
  """What the mask-slot targets need to know.

  Attributes:
    is_thing: per category, whether its segments are instances (DatasetInfo.is_thing).
    label_divisor: canonical maps store category * label_divisor + instance.
    num_mask_slots: N, the number of mask slots (kMaX: 128 COCO, 256 Cityscapes).
    output_stride: the model's output stride (4 COCO, 2 Cityscapes); targets are `label[::stride, ::stride]`.
  """

  is_thing: tuple[bool, ...]
  label_divisor: int = fmt.DEFAULT_LABEL_DIVISOR
  num_mask_slots: int = 128
  output_stride: int = 4

  @classmethod
  def from_info(cls, info: fmt.DatasetInfo, num_mask_slots: int, output_stride: int) -> "TargetConfig":
    return cls(tuple(info.is_thing), info.label_divisor, num_mask_slots, output_stride)

  def __post_init__(self):
    if self.num_mask_slots < 1:
      raise ValueError(f"num_mask_slots: expected a positive integer, found {self.num_mask_slots}")
    if self.output_stride < 1:
      raise ValueError(f"output_stride: expected a positive integer, found {self.output_stride}")


# ----------------------------------------------------------------------------------------------------------------------
# Geometry


def random_scale_crop_flip(image: np.ndarray, panoptic: np.ndarray, rng: np.random.Generator, config: AugmentConfig,
                           color_matrix=None) -> tuple[np.ndarray, np.ndarray]:
  """The train geometry: (base resize) -> random scale -> random crop with padding -> random horizontal flip, then
  the AutoAugment policy (config.autoaugment) on the crop's content, drawn after the geometry (module docstring).

  Args:
    image: uint8 [H, W, 3].
    panoptic: int32 [H, W] canonical map.
    rng: the element's generator.
    config: augmentation settings.
    color_matrix: optional 3x4 colour matrix (12-tuple, see `photometric_matrix`) applied on the way.

  Returns:
    uint8 [ch, cw, 3] image, int32 [ch, cw] map; padding is PAD_PIXEL / VOID.
  """
  h, w = panoptic.shape
  if image.shape[:2] != (h, w):
    raise ValueError(f"image {image.shape[:2]} and panoptic map {(h, w)} differ in size")
  ch, cw = config.crop_size
  base = min(ch / h, cw / w) if config.resize_to_crop else 1.0
  if config.scale_step > 0:
    steps = int(round((config.max_scale - config.min_scale) / config.scale_step))
    factor = config.min_scale + config.scale_step * int(rng.integers(0, steps + 1))
  else:
    factor = rng.uniform(config.min_scale, config.max_scale)
  scale = base * factor
  # The crop's origin in source pixels: anywhere that keeps the crop inside the scaled image, else 0 (then padded).
  r0 = int(rng.integers(0, math.floor(h - ch / scale) + 1)) if h * scale > ch else 0
  c0 = int(rng.integers(0, math.floor(w - cw / scale) + 1)) if w * scale > cw else 0
  flip = bool(rng.random() < config.flip_prob)
  out_image, out_panoptic = scale_crop(image, panoptic, scale, (r0, c0), (ch, cw), flip, config.pad_value,
                                       color_matrix, resolve_backend(config.backend))
  if config.autoaugment:
    rows, cols = content_box((h, w), scale, (r0, c0), (ch, cw), flip)
    # Contrast's degenerate grey depends on the pixel count of the whole scaled image (DeepLab2: int(side * scale)).
    num_pixels = max(1, int(h * scale)) * max(1, int(w * scale))
    if not out_image.flags.writeable:  # Pillow's arrays are read-only views.
      out_image = out_image.copy()
    out_image[rows, cols] = autoaugment_lib.apply_policy(out_image[rows, cols], rng, config.autoaugment, num_pixels)
  return out_image, out_panoptic


def content_box(shape_hw: tuple[int, int], scale: float, origin: tuple[int, int], crop_hw: tuple[int, int],
                flip: bool) -> tuple[slice, slice]:
  """The rows and columns of a `scale_crop` output that hold image content (the rest is padding).

  Mirrors resampling.scale_crop's window arithmetic (tests/data/test_autoaugment.py checks the two agree).
  """
  h, w = shape_hw
  ch, cw = crop_hw
  r0, c0 = origin
  wh, ww = min(h - r0, math.ceil(ch / scale) + 1), min(w - c0, math.ceil(cw / scale) + 1)
  out_h, out_w = min(ch, max(1, round(wh * scale))), min(cw, max(1, round(ww * scale)))
  px = cw - out_w if flip else 0
  return slice(0, out_h), slice(px, px + out_w)


def paste_segments(image: np.ndarray, panoptic: np.ndarray, partner_image: np.ndarray, partner: np.ndarray,
                   rng: np.random.Generator, is_thing: Sequence[bool], label_divisor: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Panoptic copy-paste of two crops of the same size (module docstring).

  Args:
    image, panoptic: the main crop, uint8 [h, w, 3] and int32 [h, w] canonical map.
    partner_image, partner: the partner's crop, same shapes.
    rng: the element's generator.
    is_thing: per category.
    label_divisor: of the canonical maps.

  Returns:
    The pasted image and map (new arrays).
  """
  values = np.unique(partner)
  values = values[values >= 0]
  things = np.asarray(is_thing, bool)[values // label_divisor]
  order = rng.permutation(len(values))
  keep = np.zeros(len(values), bool)
  keep[order[:int(rng.integers(0, len(values) + 1))]] = True
  chosen = values[keep | things]
  if not len(chosen):
    return image.copy(), panoptic.copy()
  # Pasted things continue the numbering of their class in the main crop (no two segments share a value).
  shift = {}
  for value in chosen[np.asarray(is_thing, bool)[chosen // label_divisor]]:
    category = int(value) // label_divisor
    if category not in shift:
      main = panoptic[(panoptic >= category * label_divisor) & (panoptic < (category + 1) * label_divisor)]
      shift[category] = int(main.max() % label_divisor) if main.size else 0
  renumbered = np.array([v + shift.get(int(v) // label_divisor, 0) for v in chosen], np.int64)
  if (renumbered % label_divisor < chosen % label_divisor).any() or np.any(
      (renumbered // label_divisor) != (chosen // label_divisor)):
    raise ValueError(f"copy-paste: more than {label_divisor} instances of one class in a crop")
  index = np.searchsorted(chosen, partner)
  pasted = (partner >= 0) & (chosen[np.minimum(index, len(chosen) - 1)] == partner)
  out_panoptic = np.where(pasted, renumbered[np.minimum(index, len(chosen) - 1)], panoptic).astype(panoptic.dtype)
  out_image = np.where(pasted[..., None], partner_image, image)
  return out_image, out_panoptic


# ----------------------------------------------------------------------------------------------------------------------
# Photometric


def photometric_matrix(rng: np.random.Generator, config: AugmentConfig, image: np.ndarray) -> tuple[float, ...] | None:
  """Draws brightness, contrast, saturation and hue jitter; returns them as one Pillow 3x4 colour matrix (12-tuple).

  out = M @ rgb + t with, in order: brightness b (x * b), contrast c (blend with the mean luma of the image),
  saturation s (blend with the pixel's luma), hue (rotation of the YIQ chroma plane). Clipping to 0..255 happens
  once, at the end. Returns None when every strength is 0.
  """
  if not (config.brightness or config.contrast or config.saturation or config.hue):
    return None
  b = rng.uniform(1 - config.brightness, 1 + config.brightness)
  c = rng.uniform(1 - config.contrast, 1 + config.contrast)
  s = rng.uniform(1 - config.saturation, 1 + config.saturation)
  theta = 2 * np.pi * rng.uniform(-config.hue, config.hue)
  mean_luma = float(image[::8, ::8].reshape(-1, 3).mean(0) @ _LUMA) * b
  saturate = s * np.eye(3) + (1 - s) * np.outer(np.ones(3), _LUMA)
  rotate = np.array([[1, 0, 0], [0, np.cos(theta), -np.sin(theta)], [0, np.sin(theta), np.cos(theta)]])
  hue = _YIQ_TO_RGB @ rotate @ _RGB_TO_YIQ
  matrix = hue @ saturate @ (c * b * np.eye(3))
  offset = (1 - c) * mean_luma * (hue @ saturate @ np.ones(3))
  return tuple(float(v) for v in np.concatenate([matrix, offset[:, None]], axis=1).ravel())


def apply_color_matrix(image: np.ndarray, matrix: tuple[float, ...] | None, backend: str = "auto") -> np.ndarray:
  """Applies a 12-tuple colour matrix to uint8 [H, W, 3] (rounded, clipped)."""
  if matrix is None:
    return image
  return recolor(np.ascontiguousarray(image), matrix, resolve_backend(backend))


# ----------------------------------------------------------------------------------------------------------------------
# Mask-slot targets

def mask_targets(panoptic: np.ndarray, config: TargetConfig) -> dict[str, np.ndarray]:
  """kMaX targets from a canonical map: per-pixel slot ids and semantic labels at the output stride, slot classes.

  Args:
    panoptic: int32 [H, W] canonical map (VOID = -1).
    config: classes, label divisor, number of slots, output stride.

  Returns:
    "semantic": int32 [hs, ws] category per pixel, -1 void;
    "slot_ids": int32 [hs, ws] mask slot per pixel, -1 for void pixels and pixels of dropped segments;
    "slot_classes": int32 [N] category of each slot, -1 for unused slots;
    "dropped_segments": int32 [] segments that did not fit in N slots.
    with hs, ws = panoptic[::stride, ::stride].shape. Order and dropping: see the module docstring.
  """
  small = np.ascontiguousarray(panoptic[::config.output_stride, ::config.output_stride])
  div = config.label_divisor
  void = small < 0
  category = np.where(void, VOID, small // div)
  is_thing = np.asarray(config.is_thing + (False,), bool)  # Index -1 (void) reads the appended False.
  if category.max(initial=-1) >= len(config.is_thing):
    raise ValueError(f"panoptic map holds category {category.max()} but the dataset has {len(config.is_thing)}")
  # Stuff merges per class whatever its instance id; void keeps -1 (sorts first).
  keys = np.where(is_thing[category], small, np.where(void, VOID, category * div))
  values = np.unique(keys)  # Hash-based and fast; return_inverse would argsort every pixel.
  inverse = np.searchsorted(values, keys)
  counts = np.bincount(inverse.ravel(), minlength=len(values))
  seg = values >= 0
  seg_values, seg_counts = values[seg], counts[seg]
  seg_category = seg_values // div
  seg_thing = is_thing[seg_category]
  order = np.lexsort((seg_values, seg_thing))  # Stuff first, then by (category, instance).
  n, num_slots = len(seg_values), config.num_mask_slots
  dropped = 0
  if n > num_slots:
    # Keep stuff before things, then larger before smaller; ties in canonical order.
    priority = np.lexsort((np.argsort(order), -seg_counts, seg_thing))
    keep = np.zeros(n, bool)
    keep[priority[:num_slots]] = True
    order = order[keep[order]]
    dropped = n - num_slots
  slot_of_segment = np.full(n, -1, np.int32)
  slot_of_segment[order] = np.arange(len(order), dtype=np.int32)
  lut = np.full(len(values), -1, np.int32)
  lut[seg] = slot_of_segment
  slot_classes = np.full(num_slots, -1, np.int32)
  slot_classes[:len(order)] = seg_category[order]
  return {
      "semantic": category.astype(np.int32),
      "slot_ids": lut[inverse],
      "slot_classes": slot_classes,
      "dropped_segments": np.int32(dropped),
  }


# ----------------------------------------------------------------------------------------------------------------------
# Grain transforms


class TrainTransform(grain.transforms.RandomMap):
  """Source element -> augmented crop with kMaX targets (see the module docstring for keys and shapes).

  An element carrying "decode_error" becomes an all-void blank with valid False (module docstring).
  """

  def __init__(self, augment: AugmentConfig, targets: TargetConfig, photometric: bool = True):
    self.augment = augment
    self.targets = targets
    self.photometric = photometric

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    if "decode_error" in element:
      return self._blank(int(element["index"]))
    image, panoptic = self._augment(element, rng, self.augment)
    partner = element.get("partner")
    if self.augment.copy_paste and partner is not None and "decode_error" not in partner:
      half = dataclasses.replace(self.augment, min_scale=self.augment.min_scale / 2,
                                 max_scale=self.augment.max_scale / 2)
      partner_image, partner_panoptic = self._augment(partner, rng, half)
      image, panoptic = paste_segments(image, panoptic, partner_image, partner_panoptic, rng,
                                       self.targets.is_thing, self.targets.label_divisor)
    return {"image": image, "panoptic": panoptic, **mask_targets(panoptic, self.targets),
            "valid": np.bool_(True), "index": np.int32(element.get("index", -1))}

  def _augment(self, element: dict, rng: np.random.Generator, augment: AugmentConfig
               ) -> tuple[np.ndarray, np.ndarray]:
    """The element's random crop: colour jitter, scale, crop, flip, then AutoAugment (when configured)."""
    image = element["image"]
    matrix = photometric_matrix(rng, augment, image) if self.photometric else None
    try:
      return random_scale_crop_flip(image, element["panoptic"], rng, augment, matrix)
    except ValueError as e:
      raise ValueError(f"example {element.get('name')!r}: {e}") from None

  def _blank(self, index: int) -> dict:
    """The element of a sample that failed to decode: same keys, shapes and dtypes, all void, valid False."""
    ch, cw = self.augment.crop_size
    panoptic = np.full((ch, cw), VOID, np.int32)
    return {"image": np.full((ch, cw, 3), self.augment.pad_value, np.uint8), "panoptic": panoptic,
            **mask_targets(panoptic, self.targets), "valid": np.bool_(False), "index": np.int32(index)}


class EvalTransform(grain.transforms.Map):
  """Source element -> resized, padded crop with targets, "valid", "content_hw" and "original_hw".

  An element with index < 0 (the eval pipeline's padding) becomes an all-void blank with valid False.
  """

  def __init__(self, crop_size: tuple[int, int], targets: TargetConfig, resize: bool = True,
               pad_value: int = PAD_PIXEL, backend: str = "auto"):
    self.crop_size = tuple(crop_size)
    self.targets = targets
    self.resize = resize
    self.pad_value = pad_value
    self.backend = backend

  def map(self, element: dict) -> dict:
    ch, cw = self.crop_size
    index = int(element.get("index", 0))
    if index < 0:
      image = np.full((ch, cw, 3), self.pad_value, np.uint8)
      panoptic = np.full((ch, cw), VOID, np.int32)
      content_hw = original_hw = (0, 0)
    else:
      original_hw = element["panoptic"].shape
      try:
        image, panoptic, content_hw = resize_and_pad(element["image"], element["panoptic"], self.crop_size,
                                                     self.resize, self.pad_value, self.backend)
      except ValueError as e:
        raise ValueError(f"example {element.get('name')!r}: {e}") from None
    return {"image": image, "panoptic": panoptic, **mask_targets(panoptic, self.targets),
            "valid": np.bool_(index >= 0), "index": np.int32(index),
            "content_hw": np.array(content_hw, np.int32), "original_hw": np.array(original_hw, np.int32)}
