"""DeepLab2's AutoAugment policy (data/autoaugment.py) and its place in the train transform."""

import dataclasses
import hashlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from panoptic_jax.data import autoaugment as A
from panoptic_jax.data import transforms as T
from panoptic_jax.training import config as config_lib

DIV = 1000
IS_THING = (False, False, True, True)
FULL, SCALED = "simple_classification_policy", "simple_classification_policy_magnitude_scale_0.2"


def _pixels(*values):
  """A 1 x n image whose every channel holds `values`."""
  return np.repeat(np.array(values, np.uint8)[None, :, None], 3, axis=2)


# ----------------------------------------------------------------------------------------------------------------------
# The policy table


def test_policy_table_is_deeplab2s():
  # deeplab2 data/preprocessing/autoaugment_policy.py, simple_classification_policy decoded by hand.
  expected = (
      (("Sharpness", 0.4, 7), ("Brightness", 0.2, 10)),
      (("Equalize", 0.0, 9), ("Contrast", 0.2, 10)),
      (("Sharpness", 0.2, 9), ("Color", 0.2, 9)),
      (("Solarize", 0.2, 7), ("Equalize", 0.6, 9)),
      (("Sharpness", 0.2, 1), ("Equalize", 0.2, 7)),
  )
  assert A.POLICIES[FULL] == expected
  scaled = A.POLICIES[SCALED]
  assert [[(op, p) for op, p, _ in sub] for sub in scaled] == [[(op, p) for op, p, _ in sub] for sub in expected]
  np.testing.assert_allclose([[lv for *_, lv in sub] for sub in scaled],
                             [[0.2 * lv for *_, lv in sub] for sub in expected])


def test_level_to_argument():
  assert A.enhance_factor(10) == pytest.approx(1.9) and A.enhance_factor(0) == pytest.approx(0.1)
  assert A.enhance_factor(10 * 0.2) == pytest.approx(0.46)
  assert A.solarize_threshold(7) == 179 and A.solarize_threshold(7 * 0.2) == 35  # int(0.14 * 256) = int(35.84)
  assert [A.posterize_bits(lv) for lv in (0, 2.4, 2.5, 5, 10)] == [0, 0, 1, 2, 4]


# ----------------------------------------------------------------------------------------------------------------------
# Ops, against hand-computed values


def test_posterize_keeps_top_bits_and_clamps_the_shift():
  image = _pixels(0b10110111, 0b01001001, 255)
  np.testing.assert_array_equal(A.posterize(image, 4)[0, :, 0], [0b10110000, 0b01000000, 0b11110000])
  np.testing.assert_array_equal(A.posterize(image, 1)[0, :, 0], [128, 0, 128])
  np.testing.assert_array_equal(A.posterize(image, 8), image)
  np.testing.assert_array_equal(A.posterize(image, 0)[0, :, 0], [128, 0, 128])  # TF clamps a shift of 8 to 7.


def test_solarize_inverts_at_and_above_threshold():
  image = _pixels(0, 127, 128, 200, 255)
  np.testing.assert_array_equal(A.solarize(image, 128)[0, :, 0], [0, 127, 127, 55, 0])
  np.testing.assert_array_equal(A.solarize(image, 0)[0, :, 0], [255, 128, 127, 55, 0])
  np.testing.assert_array_equal(A.solarize(image, 256), image)
  np.testing.assert_array_equal(A.OPS["Solarize"](image, 7)[0, :, 0], [0, 127, 128, 55, 0])  # threshold 179


def test_invert():
  np.testing.assert_array_equal(A.invert(_pixels(0, 3, 255))[0, :, 0], [255, 252, 0])


def test_brightness_scales_and_truncates():
  image = _pixels(0, 1, 100, 255)
  np.testing.assert_array_equal(A.brightness(image, 0.5)[0, :, 0], [0, 0, 50, 127])
  np.testing.assert_array_equal(A.brightness(image, 1.5)[0, :, 0], [0, 1, 150, 255])  # 382.5 clipped
  np.testing.assert_array_equal(A.brightness(image, 0.0), np.zeros_like(image))
  np.testing.assert_array_equal(A.brightness(image, 1.0), image)


def test_color_blends_with_tf_grayscale():
  red = np.array([[[255, 0, 0]]], np.uint8)
  # tf.image.rgb_to_grayscale: trunc(0.2989 * 255.5) = 76.
  np.testing.assert_array_equal(A.grayscale(red), [[76]])
  np.testing.assert_array_equal(A.color(red, 0.0), [[[76, 76, 76]]])
  np.testing.assert_array_equal(A.color(red, 0.5), [[[165, 38, 38]]])  # 76 + 0.5 * 179, 76 - 0.5 * 76
  np.testing.assert_array_equal(A.color(red, 1.5), [[[255, 0, 0]]])
  gray = _pixels(*range(0, 256, 5))
  np.testing.assert_array_equal(A.color(gray, 1.9), gray)  # Grey stays grey at any factor.


def test_contrast_blends_with_pixel_count_over_256_not_the_mean():
  image = _pixels(0, 100, 200, 255)  # 4 pixels: DeepLab2's "mean" is 4 / 256 -> 0, a blend with black.
  np.testing.assert_array_equal(A.contrast(image, 0.5)[0, :, 0], [0, 50, 100, 127])
  np.testing.assert_array_equal(A.contrast(image, 0.5, num_pixels=256 * 100)[0, :, 0], [50, 100, 150, 177])
  # From 65,280 pixels on (any training crop) the degenerate image is white: 255 + f (x - 255).
  np.testing.assert_array_equal(A.contrast(image, 1.5, num_pixels=10**6)[0, :, 0], [0, 22, 172, 255])
  np.testing.assert_array_equal(A.contrast(image, 0.5, num_pixels=10**6)[0, :, 0], [127, 177, 227, 255])


def test_autocontrast_stretches_each_channel():
  image = np.zeros((1, 3, 3), np.uint8)
  image[0, :, 0] = [0, 10, 51]  # scale 5
  image[0, :, 1] = [1, 2, 52]  # scale 5, offset -5
  image[0, :, 2] = 77  # constant: kept
  out = A.autocontrast(image)
  np.testing.assert_array_equal(out[0, :, 0], [0, 50, 255])
  np.testing.assert_array_equal(out[0, :, 1], [0, 5, 255])
  np.testing.assert_array_equal(out[0, :, 2], [77, 77, 77])


def test_sharpness_smooths_the_interior_and_keeps_the_frame():
  image = np.zeros((4, 5, 3), np.uint8)
  image[1, 1] = 255
  image[0, 4] = 200  # on the frame
  smoothed = A.sharpness(image, 0.0)
  expected = np.zeros((4, 5), np.uint8)
  expected[1, 1] = 98  # 255 * 5 / 13 = 98.08
  expected[1, 2] = expected[2, 1] = expected[2, 2] = 19  # 255 / 13 = 19.6
  expected[1, 3] = 15  # 200 / 13 = 15.4 (the frame pixel still feeds its neighbours)
  expected[0, 4] = 200
  np.testing.assert_array_equal(smoothed[..., 0], expected)
  np.testing.assert_array_equal(A.sharpness(image, 1.0), image)
  # Factor 2: 2 * original - smoothed, clipped: the impulse's neighbours go to 0, the impulse to 255.
  np.testing.assert_array_equal(A.sharpness(image, 2.0)[1, :3, 0], [0, 255, 0])
  tiny = np.full((2, 7, 3), 9, np.uint8)
  np.testing.assert_array_equal(A.sharpness(tiny, 0.0), tiny)


@pytest.mark.parametrize("kind", ["random", "skewed", "constant_channel", "two_values"])
def test_equalize_matches_pil(kind):
  rng = np.random.default_rng(3)
  image = {
      "random": rng.integers(0, 256, (31, 17, 3)),
      "skewed": np.clip(rng.normal(60, 12, (40, 30, 3)), 0, 255),
      "constant_channel": np.dstack([rng.integers(0, 256, (9, 9)), np.full((9, 9), 42), rng.integers(0, 9, (9, 9))]),
      "two_values": rng.choice([10, 200], (8, 8, 3)),
  }[kind].astype(np.uint8)
  expected = np.asarray(ImageOps.equalize(Image.fromarray(image)))
  np.testing.assert_array_equal(A.equalize(image), expected)


# Independently computed: DeepLab2's autoaugment_utils.py run with TensorFlow 2.21 (CPU) on
# np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8); sha256 of the output bytes, first 16 digits.
_TF_REFERENCE = {
    ("AutoContrast", 0): "31dfa834aaff1ca8",
    ("Equalize", 0): "b78d64d458810500",
    ("Invert", 0): "2643482ca33899ae",
    ("Posterize", 5): "b40d1c26bd651ee6",
    ("Solarize", 7): "17988ed711909a09",
    ("Color", 9): "88c138e81e81522b",
    ("Contrast", 10): "d618beb5f01abff2",
    ("Brightness", 2.0): "06e41df6046ce953",
    ("Sharpness", 7): "30bcf4dadc245d95",
    ("Sharpness", 7 * 0.2): "75978c3c0e66d836",
}
# The same TF code smooths a flat region of value v to v - 1 (float32 truncation) for exactly these v.
_TF_FLAT_SMOOTHED_DOWN = (3, 6, 12, 15, 23, 24, 30, 31, 46, 47, 48, 49, 60, 61, 62, 79, 81, 85, 92, 94, 96, 98, 107,
                          109, 111, 120, 122, 124, 158, 162, 170, 171, 175, 179, 183, 184, 188, 192, 196, 197, 201, 205,
                          209, 214, 218, 222, 227, 231, 235, 240, 244, 248, 253)


@pytest.mark.parametrize("op,level", sorted(_TF_REFERENCE))
def test_ops_match_deeplab2_tensorflow(op, level):
  image = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
  out = A.OPS[op](image, level)
  assert out.dtype == np.uint8 and out.shape == image.shape
  assert hashlib.sha256(out.tobytes()).hexdigest()[:16] == _TF_REFERENCE[(op, level)]


def test_sharpness_of_flat_regions_truncates_like_tensorflow():
  flat = np.arange(256, dtype=np.uint8)[:, None, None, None] * np.ones((1, 3, 3, 3), np.uint8)
  down = [v for v in range(256) if A.sharpness(flat[v], 0.0)[1, 1, 0] == v - 1]
  assert tuple(down) == _TF_FLAT_SMOOTHED_DOWN
  assert all(A.sharpness(flat[v], 0.0)[1, 1, 0] in (v, v - 1) for v in range(256))


# ----------------------------------------------------------------------------------------------------------------------
# The policy


@pytest.mark.parametrize("name", [FULL, SCALED])
def test_apply_policy_is_deterministic_and_runs_the_drawn_ops(name):
  image = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
  changed = 0
  for seed in range(40):
    out = A.apply_policy(image, np.random.default_rng(seed), name)
    np.testing.assert_array_equal(out, A.apply_policy(image, np.random.default_rng(seed), name))
    expected = image
    for op, level in A.draw_sub_policy(np.random.default_rng(seed), name):
      expected = A.OPS[op](expected, level)
    np.testing.assert_array_equal(out, expected)
    changed += not np.array_equal(out, image)
  assert 5 <= changed <= 30  # 42% of images get at least one op.


def test_policy_samples_sub_policies_and_ops_with_the_right_frequencies():
  rng = np.random.default_rng(0)
  n = 20000
  draws = [A.draw_sub_policy(rng, FULL) for _ in range(n)]
  # P(op at level runs) = 1/5 (its sub-policy) x its probability. Equalize 9 of sub-policy 1 never runs (p = 0).
  expected = {("Sharpness", 7): 0.08, ("Brightness", 10): 0.04, ("Contrast", 10): 0.04, ("Sharpness", 9): 0.04,
              ("Color", 9): 0.04, ("Solarize", 7): 0.04, ("Equalize", 9): 0.12, ("Sharpness", 1): 0.04,
              ("Equalize", 7): 0.04}
  counts = {key: 0 for key in expected}
  for ops in draws:
    for key in ops:
      counts[key] += 1
  for key, p in expected.items():
    assert abs(counts[key] / n - p) < 5 * np.sqrt(p * (1 - p) / n), (key, counts[key] / n, p)
  # Ops of one sub-policy run together, in order; never two sub-policies.
  both = sum(ops == (("Solarize", 7), ("Equalize", 9)) for ops in draws) / n
  assert abs(both - 0.2 * 0.2 * 0.6) < 5 * np.sqrt(0.024 / n)
  assert all(len(ops) <= 2 for ops in draws)
  # No op: mean over sub-policies of the product of (1 - p) = (0.48 + 0.8 + 0.64 + 0.32 + 0.64) / 5.
  assert abs(sum(not ops for ops in draws) / n - 0.576) < 5 * np.sqrt(0.576 * 0.424 / n)


def test_invalid_policy_names_are_errors():
  image = np.zeros((4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match=r"unknown AutoAugment policy 'rand_augment'; known: \['simple_"):
    A.apply_policy(image, np.random.default_rng(0), "rand_augment")
  with pytest.raises(ValueError, match=r"autoaugment: expected '' \(off\) or one of \['simple_classification_policy'"):
    T.AugmentConfig(autoaugment="simple")
  with pytest.raises(ValueError, match="uint8"):
    A.apply_policy(image.astype(np.float32), np.random.default_rng(0), FULL)


def test_run_config_exposes_and_validates_autoaugment():
  config = config_lib.base_config()
  assert config.input.autoaugment == ""
  config.dataset.train = config.dataset.val = "data"
  config.input.autoaugment = SCALED
  config_lib.validate(config)
  assert config_lib.augment_config(config).autoaugment == SCALED
  config.input.autoaugment = "simple_classification_policy_magnitude_scale_0.5"
  with pytest.raises(config_lib.ConfigError, match=r"config.input.autoaugment: expected '' \(off\) or one of "
                                                   r"\['simple_classification_policy', 'simple_classification_policy_"
                                                   r"magnitude_scale_0.2'\], found 'simple_classification_policy_"
                                                   r"magnitude_scale_0.5'"):
    config_lib.validate(config)


# ----------------------------------------------------------------------------------------------------------------------
# In the train transform


def _scene(h=40, w=56):
  pan = np.full((h, w), 1 * DIV, np.int32)
  pan[h // 2:] = 0
  pan[h // 2 - 8:h // 2 + 4, 4:20] = 2 * DIV + 1
  pan[6:30, w - 12:w - 4] = 3 * DIV + 1
  pan[:3] = T.VOID
  image = np.random.default_rng(9).integers(0, 256, (h, w, 3), dtype=np.uint8)
  return image, pan


def _config(**kw):
  return T.AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, backend="pil", **kw)


def _replay_geometry(rng, config, shape):
  """random_scale_crop_flip's draws (continuous scale, no base resize): (scale, origin, flip); rng then past them."""
  (h, w), (ch, cw) = shape, config.crop_size
  scale = rng.uniform(config.min_scale, config.max_scale)
  r0 = int(rng.integers(0, int(np.floor(h - ch / scale)) + 1)) if h * scale > ch else 0
  c0 = int(rng.integers(0, int(np.floor(w - cw / scale)) + 1)) if w * scale > cw else 0
  return scale, (r0, c0), bool(rng.random() < config.flip_prob)


def test_content_box_is_where_scale_crop_puts_the_image():
  image, pan = _scene()
  image = np.maximum(image, 1)  # Pad value 0 marks the padding.
  config = _config(crop_size=(33, 65), min_scale=0.3, max_scale=2.5, pad_value=0)
  for seed in range(60):
    out, _ = T.random_scale_crop_flip(image, pan, np.random.default_rng(seed), config)
    scale, origin, flip = _replay_geometry(np.random.default_rng(seed), config, pan.shape)
    rows, cols = T.content_box(pan.shape, scale, origin, config.crop_size, flip)
    content = np.zeros(config.crop_size, bool)
    content[rows, cols] = True
    np.testing.assert_array_equal(out.min(axis=-1) > 0, content, err_msg=f"seed {seed}")


@pytest.mark.parametrize("name", [FULL, SCALED])
def test_train_transform_changes_only_the_image_content(name):
  image, pan = _scene()
  targets = T.TargetConfig(IS_THING, DIV, 16, 4)
  off = T.TrainTransform(_config(crop_size=(33, 65), min_scale=0.4, max_scale=2.0), targets)
  on = T.TrainTransform(dataclasses.replace(off.augment, autoaugment=name), targets)
  element = {"image": image, "panoptic": pan, "name": "x", "index": 3}
  changed = padded = 0
  for seed in range(30):
    a = off.random_map(dict(element), np.random.default_rng(seed))
    b = on.random_map(dict(element), np.random.default_rng(seed))
    for key in a:  # The same geometry draws: labels and targets identical.
      if key != "image":
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_array_equal(b["image"], on.random_map(dict(element), np.random.default_rng(seed))["image"])
    # The crop's content is the policy applied to the plain crop with the draws that follow the geometry's (DeepLab2:
    # after the scale, on the scaled image); the padding keeps the pad value.
    rng = np.random.default_rng(seed)
    scale, origin, flip = _replay_geometry(rng, off.augment, pan.shape)
    rows, cols = T.content_box(pan.shape, scale, origin, off.augment.crop_size, flip)
    num_pixels = int(pan.shape[0] * scale) * int(pan.shape[1] * scale)
    expected = a["image"].copy()
    expected[rows, cols] = A.apply_policy(a["image"][rows, cols], rng, name, num_pixels)
    np.testing.assert_array_equal(b["image"], expected)
    changed += not np.array_equal(a["image"], b["image"])
    padded += expected[rows, cols].size < expected.size
  assert changed >= 5 and padded >= 5


def test_copy_paste_partner_is_augmented_too_and_deterministic():
  image, pan = _scene()
  partner = {"image": np.full_like(image, 200), "panoptic": np.full_like(pan, 3 * DIV + 1), "name": "p", "index": 1}
  element = {"image": image, "panoptic": pan, "name": "m", "index": 0, "partner": partner}
  transform = T.TrainTransform(_config(crop_size=(33, 33), copy_paste=True, autoaugment=FULL),
                               T.TargetConfig(IS_THING, DIV, 16, 4))
  seen = set()
  for seed in range(40):
    a = transform.random_map(dict(element), np.random.default_rng(seed))
    b = transform.random_map(dict(element), np.random.default_rng(seed))
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    pasted = a["panoptic"] == 3 * DIV + 2
    seen.update(np.unique(a["image"][pasted]).tolist())
  assert len(seen) > 1  # The partner's flat 200 is changed by some draws (Brightness, Contrast, Solarize, ...).
