"""DeepLab2's AutoAugment-style photometric policy, in numpy, on uint8 RGB images.

DeepLab2's kMaX-DeepLab recipes set `train_dataset_options.augmentations.autoaugment_policy_name`:
"simple_classification_policy" for COCO and ADE20K (`configs/{coco,ade20k}/kmax_deeplab/*.textproto`) and
"simple_classification_policy_magnitude_scale_0.2" for Cityscapes (`configs/cityscapes/kmax_deeplab/*.textproto`).
What follows reproduces, from google-research/deeplab2 (as of April 2023):

- `data/preprocessing/autoaugment_policy.py`: `augmentation_reduced_operations` (the op names, indexed by the policy's
  numbers), `augmentation_probabilities`, `simple_classification_policy` (30 numbers: 5 sub-policies of 2 ops, each
  (op id, probability id, level)), `convert_policy` (probability = table[id] * probability_scale, level = level *
  magnitude_scale) and `available_policies`. Decoded, as (op, probability, level):

      sub-policy   simple_classification_policy              ..._magnitude_scale_0.2
      0            Sharpness 0.4 7,   Brightness 0.2 10      Sharpness 0.4 1.4, Brightness 0.2 2.0
      1            Equalize 0.0 9,    Contrast 0.2 10        Equalize 0.0 1.8,  Contrast 0.2 2.0
      2            Sharpness 0.2 9,   Color 0.2 9            Sharpness 0.2 1.8, Color 0.2 1.8
      3            Solarize 0.2 7,    Equalize 0.6 9         Solarize 0.2 1.4,  Equalize 0.6 1.8
      4            Sharpness 0.2 1,   Equalize 0.2 7         Sharpness 0.2 0.2, Equalize 0.2 1.4

  (Equalize in sub-policy 1 has probability 0: it never runs.)
- `data/preprocessing/autoaugment_utils.py`: each op (`blend`, `solarize`, `invert`, `color`, `contrast`,
  `brightness`, `posterize`, `autocontrast`, `sharpness`, `equalize`), `level_to_arg` (enhance ops: factor =
  level / 10 * 1.8 + 0.1, i.e. 1.9 at level 10 and 0.46 at level 2, never a random sign; Posterize: bits =
  int(level / 10 * 4); Solarize: threshold = int(level / 10 * 256)), `select_and_apply_random_policy` (one sub-policy
  drawn uniformly per image) and `_apply_func_with_prob` (each of its ops then runs with its own probability, in
  order). Labels are never touched (`label_wrapper`: none of these ops moves a pixel).

Where it applies (`data/preprocessing/input_preprocessing.py`, `preprocess_image_and_label` and
`_autoaugment_helper`; `data/sample_generator.py` passes the policy name to both the main and the copy-paste
partner's preprocessing): in training only, after the random scale and before the padding, random crop and flip,
on the image cast to uint8. `transforms.random_scale_crop_flip` applies it to the crop's image content (never its
padding); see `AugmentConfig.autoaugment`.

The arithmetic follows the TF ops: blends in float32 then truncated to uint8 (clipped first when extrapolating);
grayscale as `tf.image.rgb_to_grayscale` on uint8 (x / 255 in float32, weights 0.2989 / 0.587 / 0.114, then x 255.5
truncated); Sharpness's smoothing (PIL's SMOOTH kernel / 13) in float32 with fused multiply-adds, truncated, the
1-pixel border kept; Equalize's integer LUT (identical to PIL's `ImageOps.equalize`). Faithful also where DeepLab2
differs from PIL:

- Contrast blends with a constant grey of min(255, floor(H * W / 256)), not the image's mean luma: DeepLab2 takes
  the sum of the 256-bin histogram, i.e. the pixel count, for the mean. This is the known bug of TF's AutoAugment
  code (tensorflow/models issue 8328, tensorflow/tpu issue 1057; fixed in tensorflow/models in 2024, not in
  DeepLab2), kept here because DeepLab2's kMaX results were trained with it. For any image of 65,280 pixels or more
  the degenerate image is white, so Contrast(1.9) darkens strongly (255 + 1.9 (x - 255)) and Contrast(0.46) washes
  out towards white.
- Sharpness truncates the smoothed image where PIL rounds, and keeps the image's 1-pixel frame unsmoothed.
- Posterize clamps the shift to 0..7 like TF's `right_shift` (bits 0 keeps the top bit; PIL would give black). It is
  not in either policy.

Checked bit for bit against DeepLab2's autoaugment_utils run with TensorFlow 2.21 on CPU (every op, levels 0..10,
random, flat and gradient images): the float32 details matter because results are truncated, e.g. Sharpness of a
flat region of value v sums 9 products to v up to float32 rounding and TF's kernel (one fused multiply-add per tap,
row-major) gives v - 1 for some v, which is reproduced here. Another TF build or device could order or fuse the
grayscale and smoothing sums differently and differ by 1 on such pixels.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# autoaugment_policy.py: the op behind each id of a policy, and the probability behind each probability id.
OPERATIONS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "Color", "Contrast", "Brightness",
              "Sharpness")
PROBABILITIES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# autoaugment_policy.py: simple_classification_policy, 5 sub-policies x 2 ops x (op id, probability id, level).
SIMPLE_CLASSIFICATION_POLICY = (8, 2, 7, 7, 1, 10,
                                1, 0, 9, 6, 1, 10,
                                8, 1, 9, 5, 1, 9,
                                4, 1, 7, 1, 3, 9,
                                8, 1, 1, 1, 1, 7)
MAX_LEVEL = 10.0

Policy = tuple[tuple[tuple[str, float, float], ...], ...]


def convert_policy(numbers, probability_scale: float = 1.0, magnitude_scale: float = 1) -> Policy:
  """autoaugment_policy.convert_policy: 6 numbers per sub-policy -> ((op, probability, level), (op, ...))."""
  if len(numbers) % 6:
    raise ValueError(f"policy length must be a multiple of 6, found {len(numbers)}")
  policy = []
  for n in range(len(numbers) // 6):
    sub = []
    for i in range(2):
      op_id, prob_id, level = numbers[6 * n + 3 * i:6 * n + 3 * (i + 1)]
      sub.append((OPERATIONS[op_id], PROBABILITIES[prob_id] * probability_scale, level * magnitude_scale))
    policy.append(tuple(sub))
  return tuple(policy)


# autoaugment_policy.available_policies.
POLICIES: dict[str, Policy] = {
    "simple_classification_policy_magnitude_scale_0.2": convert_policy(SIMPLE_CLASSIFICATION_POLICY,
                                                                       magnitude_scale=0.2),
    "simple_classification_policy": convert_policy(SIMPLE_CLASSIFICATION_POLICY, magnitude_scale=1),
}


def check_policy_name(name: str) -> None:
  """Raises ValueError, naming the known policies, unless `name` is one of them."""
  if name not in POLICIES:
    raise ValueError(f"unknown AutoAugment policy {name!r}; known: {sorted(POLICIES)}")


# ----------------------------------------------------------------------------------------------------------------------
# Primitives (autoaugment_utils.py), uint8 [H, W, 3] -> uint8 [H, W, 3]


def blend(image1: np.ndarray, image2: np.ndarray, factor: float) -> np.ndarray:
  """image1 + factor * (image2 - image1) in float32, truncated to uint8 (clipped to 0..255 when extrapolating)."""
  if factor == 0.0:
    return np.array(image1, np.uint8)
  if factor == 1.0:
    return np.array(image2, np.uint8)
  a = np.asarray(image1, np.float32)
  temp = a + np.float32(factor) * (np.asarray(image2, np.float32) - a)
  if 0.0 < factor < 1.0:
    return temp.astype(np.uint8)
  return np.clip(temp, 0.0, 255.0).astype(np.uint8)


# tf.image.rgb_to_grayscale's per-channel terms, float32(float32(x / 255) * weight), by uint8 value.
_GRAY_TERMS = [np.arange(256, dtype=np.float32) * np.float32(1.0 / 255) * weight
               for weight in np.array([0.2989, 0.5870, 0.1140], np.float32)]


def grayscale(image: np.ndarray) -> np.ndarray:
  """tf.image.rgb_to_grayscale on uint8: uint8 [H, W] (x / 255 in float32, weighted, summed, x 255.5, truncated)."""
  gray = _GRAY_TERMS[0][image[..., 0]]
  gray += _GRAY_TERMS[1][image[..., 1]]
  gray += _GRAY_TERMS[2][image[..., 2]]
  gray *= np.float32(255.5)
  return gray.astype(np.uint8)


def invert(image: np.ndarray) -> np.ndarray:
  """255 - x."""
  return 255 - image


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
  """Pixels below `threshold` kept, the others inverted."""
  return np.where(image < threshold, image, 255 - image).astype(np.uint8)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
  """Keeps the top `bits` bits (the shift 8 - bits clamped to 0..7, as TF's bitwise shifts do)."""
  shift = min(max(8 - int(bits), 0), 7)
  return ((image >> shift) << shift).astype(np.uint8)


def color(image: np.ndarray, factor: float) -> np.ndarray:
  """Blend with the image's grayscale (0: grey, 1: unchanged, > 1: more saturated)."""
  return blend(np.repeat(grayscale(image)[..., None], 3, axis=2), image, factor)


def contrast(image: np.ndarray, factor: float, num_pixels: int | None = None) -> np.ndarray:
  """Blend with a constant grey of min(255, floor(num_pixels / 256)) (DeepLab2's "mean"; module docstring).

  Args:
    image: uint8 [H, W, 3].
    factor: blend factor.
    num_pixels: the pixel count DeepLab2 sees (the whole scaled image, when `image` is a window of it); default H * W.
  """
  count = image.shape[0] * image.shape[1] if num_pixels is None else num_pixels
  grey = np.uint8(np.clip(np.float32(count) / np.float32(256.0), 0.0, 255.0))
  return blend(np.full_like(image, grey, dtype=np.uint8), image, factor)


def brightness(image: np.ndarray, factor: float) -> np.ndarray:
  """Blend with black: x * factor."""
  return blend(np.zeros_like(image, np.uint8), image, factor)


def autocontrast(image: np.ndarray) -> np.ndarray:
  """Per channel, stretch min..max to 0..255 in float32 (truncated); a constant channel is kept."""
  out = np.empty_like(image, np.uint8)
  for c in range(image.shape[2]):
    channel = image[..., c]
    lo, hi = np.float32(channel.min()), np.float32(channel.max())
    if hi > lo:
      scale = np.float32(255.0) / (hi - lo)
      offset = -lo * scale
      out[..., c] = np.clip(channel.astype(np.float32) * scale + offset, 0.0, 255.0).astype(np.uint8)
    else:
      out[..., c] = channel
  return out


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13.0)
_SMOOTH64 = _SMOOTH.astype(np.float64)
_BAND = 8


def sharpness(image: np.ndarray, factor: float) -> np.ndarray:
  """Blend with the image smoothed by PIL's SMOOTH kernel (float32, truncated; the 1-pixel frame unsmoothed)."""
  h, w, c = image.shape
  smoothed = np.array(image, np.uint8)
  # One float32 fused multiply-add per tap, in row-major order: the product of a uint8 and a float32 and its sum with
  # a float32 below 256 are exact in float64, so rounding once to float32 is the FMA's rounding. By bands of rows,
  # which keeps the float64 temporaries in cache (5x faster than whole-image passes).
  interior_rows = h - 2 if w >= 3 else 0  # Images under 3x3 have no interior: unchanged.
  for r in range(0, max(interior_rows, 0), _BAND):
    n = min(_BAND, h - 2 - r)
    x = image[r:r + n + 2].astype(np.float64)
    acc = np.zeros((n, w - 2, c), np.float32)
    tmp = np.empty((n, w - 2, c), np.float64)
    for dy in range(3):
      for dx in range(3):
        np.multiply(x[dy:dy + n, dx:dx + w - 2], _SMOOTH64[dy, dx], out=tmp)
        tmp += acc
        acc[...] = tmp
    smoothed[r + 1:r + 1 + n, 1:-1] = np.clip(acc, 0.0, 255.0)
  return blend(smoothed, image, factor)


def equalize(image: np.ndarray) -> np.ndarray:
  """Per-channel histogram equalisation with PIL's integer LUT (a channel with one value, or step 0, is kept)."""
  out = np.empty_like(image, np.uint8)
  for c in range(image.shape[2]):
    channel = image[..., c]
    histo = np.bincount(channel.ravel(), minlength=256).astype(np.int64)
    nonzero = histo[histo != 0]
    step = (int(nonzero.sum()) - int(nonzero[-1])) // 255 if len(nonzero) else 0
    if step == 0:
      out[..., c] = channel
      continue
    lut = (np.cumsum(histo) + step // 2) // step
    lut = np.clip(np.concatenate([[0], lut[:-1]]), 0, 255).astype(np.uint8)
    out[..., c] = lut[channel]
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Ops by name: op(image, level) with autoaugment_utils.level_to_arg's mapping of the level to the primitive's argument


def enhance_factor(level: float) -> float:
  """autoaugment_utils._enhance_level_to_arg: level 0..10 -> factor 0.1..1.9."""
  return (level / MAX_LEVEL) * 1.8 + 0.1


def posterize_bits(level: float) -> int:
  """level 0..10 -> bits kept 0..4."""
  return int((level / MAX_LEVEL) * 4)


def solarize_threshold(level: float) -> int:
  """level 0..10 -> threshold 0..256."""
  return int((level / MAX_LEVEL) * 256)


OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "AutoContrast": lambda image, level: autocontrast(image),
    "Equalize": lambda image, level: equalize(image),
    "Invert": lambda image, level: invert(image),
    "Posterize": lambda image, level: posterize(image, posterize_bits(level)),
    "Solarize": lambda image, level: solarize(image, solarize_threshold(level)),
    "Color": lambda image, level: color(image, enhance_factor(level)),
    "Contrast": lambda image, level: contrast(image, enhance_factor(level)),
    "Brightness": lambda image, level: brightness(image, enhance_factor(level)),
    "Sharpness": lambda image, level: sharpness(image, enhance_factor(level)),
}


def draw_sub_policy(rng: np.random.Generator, policy_name: str) -> tuple[tuple[str, float], ...]:
  """Draws what a policy does to one image: a sub-policy uniformly, then each of its ops with its probability.

  Always consumes the same draws from `rng` (1 integer, then one uniform per op of the sub-policy).

  Returns:
    The (op, level) pairs to apply, in order (possibly none).
  """
  check_policy_name(policy_name)
  policy = POLICIES[policy_name]
  sub = policy[int(rng.integers(len(policy)))]
  draws = rng.random(len(sub))
  return tuple((name, level) for (name, prob, level), u in zip(sub, draws) if u < prob)


def apply_policy(image: np.ndarray, rng: np.random.Generator, policy_name: str, num_pixels: int | None = None
                 ) -> np.ndarray:
  """Applies the named policy to one image (autoaugment_utils.distort_image_with_autoaugment).

  Args:
    image: uint8 [H, W, 3].
    rng: the element's generator (draws as in `draw_sub_policy`).
    policy_name: a key of POLICIES.
    num_pixels: the pixel count of the image DeepLab2 would augment when `image` is only a window of it (the whole
      scaled image); only Contrast depends on it (module docstring). Default H * W.

  Returns:
    uint8 [H, W, 3] (the input itself when no op runs).
  """
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"AutoAugment: expected a uint8 [H, W, 3] image, found {image.dtype} {image.shape}")
  for name, level in draw_sub_policy(rng, policy_name):
    if name == "Contrast":
      image = contrast(image, enhance_factor(level), num_pixels)
    else:
      image = OPS[name](image, level)
  return image
