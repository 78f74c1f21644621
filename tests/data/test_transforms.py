"""Transforms on in-memory arrays: geometry (scale, crop, pad, flip), photometric jitter, eval resizing, targets."""

import numpy as np
import pytest

from panoptic_jax.data import resampling
from panoptic_jax.data import transforms as T

VOID = T.VOID
DIV = 1000
# Categories: 0 road (stuff), 1 sky (stuff), 2 car (thing), 3 person (thing).
IS_THING = (False, False, True, True)


def _targets_config(num_slots=16, stride=1):
  return T.TargetConfig(IS_THING, DIV, num_slots, stride)


def _scene(h=48, w=64):
  """A label map with stuff, things and void, and an image whose colour encodes the label (blocks, no noise)."""
  pan = np.full((h, w), 1 * DIV, np.int32)                 # sky
  pan[h // 2:] = 0 * DIV                                   # road
  pan[h // 2 - 8:h // 2 + 4, 4:20] = 2 * DIV + 1           # car 1
  pan[h // 2 - 8:h // 2 + 4, 30:44] = 2 * DIV + 2          # car 2
  pan[6:30, 50:58] = 3 * DIV + 1                           # person 1
  pan[:3, :] = VOID                                        # void band
  pan[h - 6:, w - 10:] = 1 * DIV + 7                       # sky with a stray instance id: still the sky segment
  return pan


def _colour_of(pan):
  """A distinct colour per label value (void black)."""
  values = np.unique(pan)
  lut = {v: ((37 * i + 50) % 256, (91 * i + 20) % 256, (53 * i + 200) % 256) for i, v in enumerate(values)}
  lut[VOID] = (0, 0, 0)
  image = np.zeros(pan.shape + (3,), np.uint8)
  for v, c in lut.items():
    image[pan == v] = c
  return image, lut


def _no_photometric(**kw):
  return T.AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0, **kw)


# ----------------------------------------------------------------------------------------------------------------------
# Targets


def test_targets_cover_non_void_pixels_stuff_merged_things_separate():
  pan = _scene()
  out = T.mask_targets(pan, _targets_config(num_slots=8))
  slot_ids, classes = out["slot_ids"], out["slot_classes"]
  assert slot_ids.dtype == np.int32 and classes.dtype == np.int32 and slot_ids.shape == pan.shape
  # Exactly the non-void pixels have a slot.
  np.testing.assert_array_equal(slot_ids >= 0, pan != VOID)
  # Stuff first (road, sky), then things by (category, instance); the stray sky id merged into sky.
  np.testing.assert_array_equal(classes, [0, 1, 2, 2, 3, -1, -1, -1])
  for slot, value in enumerate([0, 1 * DIV, 2 * DIV + 1, 2 * DIV + 2, 3 * DIV + 1]):
    expected = (pan == value) | ((pan == 1 * DIV + 7) if value == 1 * DIV else False)
    np.testing.assert_array_equal(slot_ids == slot, expected)
  # Each slot's class is the category of its pixels; semantic agrees.
  np.testing.assert_array_equal(out["semantic"], np.where(pan == VOID, -1, pan // DIV))
  np.testing.assert_array_equal(classes[slot_ids[pan != VOID]], pan[pan != VOID] // DIV)
  assert out["dropped_segments"] == 0


def test_targets_at_output_stride():
  pan = np.full((33, 49), VOID, np.int32)
  pan[::4, ::4] = 0  # road only on the strided grid
  pan[1, 1] = 2 * DIV + 1  # a car that the stride never samples: no slot
  out = T.mask_targets(pan, _targets_config(num_slots=4, stride=4))
  assert out["slot_ids"].shape == out["semantic"].shape == (9, 13)  # (33 - 1) // 4 + 1, (49 - 1) // 4 + 1
  assert (out["slot_ids"] == 0).all()
  np.testing.assert_array_equal(out["slot_classes"], [0, -1, -1, -1])


def test_targets_all_void_and_empty():
  out = T.mask_targets(np.full((9, 9), VOID, np.int32), _targets_config(num_slots=3))
  assert (out["slot_ids"] == -1).all() and (out["semantic"] == -1).all()
  np.testing.assert_array_equal(out["slot_classes"], [-1, -1, -1])


def test_too_many_segments_drops_smallest_things_with_count(caplog):
  pan = np.zeros((20, 40), np.int32)  # road
  sizes = [1, 2, 3, 4, 5, 6]
  for k, s in enumerate(sizes):  # cars 1..6 of growing area s x 2
    pan[2:2 + s, 6 * k:6 * k + 2] = 2 * DIV + k + 1
  pan[15:, :5] = 1 * DIV  # sky
  with caplog.at_level("WARNING"):
    out = T.mask_targets(pan, _targets_config(num_slots=5))
  assert out["dropped_segments"] == 3
  assert not caplog.records  # No warning per image: the training loop warns a few times per run with the count.
  # Kept: road, sky, and the three largest cars (4, 5, 6) in canonical order.
  np.testing.assert_array_equal(out["slot_classes"], [0, 1, 2, 2, 2])
  for slot, car in zip([2, 3, 4], [4, 5, 6]):
    np.testing.assert_array_equal(out["slot_ids"] == slot, pan == 2 * DIV + car)
  dropped = np.isin(pan, [2 * DIV + 1, 2 * DIV + 2, 2 * DIV + 3])
  assert (out["slot_ids"][dropped] == -1).all()
  assert (out["semantic"][dropped] == 2).all()  # Semantic labels of dropped segments are kept.


def test_targets_reject_unknown_category():
  with pytest.raises(ValueError, match="category 7"):
    T.mask_targets(np.full((4, 4), 7 * DIV, np.int32), _targets_config())


# ----------------------------------------------------------------------------------------------------------------------
# Geometry


def test_scale_one_full_crop_is_identity():
  pan = _scene()
  image, _ = _colour_of(pan)
  config = _no_photometric(crop_size=pan.shape, min_scale=1.0, max_scale=1.0, flip_prob=0.0)
  out_image, out_pan = T.random_scale_crop_flip(image, pan, np.random.default_rng(0), config)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_pan, pan)


def test_flip_flips_labels_with_image():
  pan = _scene()
  image, _ = _colour_of(pan)
  config = _no_photometric(crop_size=pan.shape, min_scale=1.0, max_scale=1.0, flip_prob=1.0)
  out_image, out_pan = T.random_scale_crop_flip(image, pan, np.random.default_rng(0), config)
  np.testing.assert_array_equal(out_image, image[:, ::-1])
  np.testing.assert_array_equal(out_pan, pan[:, ::-1])


def test_pad_is_void_and_pad_pixel_bottom_right_and_left_after_flip():
  pan = _scene(24, 32)
  image, _ = _colour_of(pan)
  for flip in (0.0, 1.0):
    config = _no_photometric(crop_size=(41, 57), min_scale=1.0, max_scale=1.0, flip_prob=flip)
    out_image, out_pan = T.random_scale_crop_flip(image, pan, np.random.default_rng(0), config)
    assert out_image.shape == (41, 57, 3) and out_pan.shape == (41, 57)
    cols = slice(57 - 32, 57) if flip else slice(0, 32)
    content = np.zeros((41, 57), bool)
    content[:24, cols] = True
    assert (out_pan[~content] == VOID).all()
    assert (out_image[~content] == T.PAD_PIXEL).all()
    np.testing.assert_array_equal(out_pan[:24, cols], pan[:, ::-1] if flip else pan)


@pytest.mark.parametrize("backend", ["pil", "cv2"])
def test_random_geometry_keeps_labels_aligned_with_pixels(backend):
  """Colour encodes the label: wherever a pixel's label neighbourhood is uniform, its colour must be that label's."""
  pan = np.kron(_scene(24, 32), np.ones((2, 2), np.int32))  # 48x64 with 2-pixel blocks
  image, lut = _colour_of(pan)
  if backend == "cv2" and resampling.opencv() is None:
    pytest.skip("OpenCV not installed")
  config = _no_photometric(crop_size=(33, 41), min_scale=0.6, max_scale=2.0, backend=backend)
  for seed in range(12):
    out_image, out_pan = T.random_scale_crop_flip(image, pan, np.random.default_rng(seed), config)
    padded = np.pad(out_pan, 1, mode="edge")
    uniform = np.ones(out_pan.shape, bool)
    for dy in (0, 1, 2):
      for dx in (0, 1, 2):
        uniform &= padded[dy:dy + out_pan.shape[0], dx:dx + out_pan.shape[1]] == out_pan
    checked = uniform & (out_pan != VOID)
    assert checked.sum() > 100
    expected = np.array([lut[v] for v in out_pan[checked]])
    np.testing.assert_allclose(out_image[checked].astype(int), expected, atol=2)


def test_train_geometry_scales_and_crops():
  pan = _scene()
  image, _ = _colour_of(pan)
  config = _no_photometric(crop_size=(17, 21), min_scale=2.0, max_scale=2.0, flip_prob=0.0)
  out_image, out_pan = T.random_scale_crop_flip(image, pan, np.random.default_rng(3), config)
  assert out_image.shape == (17, 21, 3)
  assert (out_pan != VOID).any()
  # Scale 2 without padding: every label value in the crop comes from the source.
  assert set(np.unique(out_pan)) <= set(np.unique(pan))


BACKENDS = ["pil"] + (["cv2"] if resampling.opencv() is not None else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_recolour_before_or_after_resize_agree(backend):
  """The colour matrix goes on whichever of source window / crop is smaller; with the identity both are exact."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  pan = np.zeros((40, 60), np.int32)
  identity = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
  for scale, origin in ((2.0, (5, 10)), (1.5, (0, 0)), (3.0, (20, 40)), (0.7, (0, 0))):
    with_matrix, _ = resampling.scale_crop(image, pan, scale, origin, (33, 41), False, 128, identity, backend)
    without, _ = resampling.scale_crop(image, pan, scale, origin, (33, 41), False, 128, None, backend)
    np.testing.assert_array_equal(with_matrix, without)


@pytest.mark.skipif(resampling.opencv() is None, reason="OpenCV not installed")
def test_backends_agree():
  pan = np.kron(_scene(24, 32), np.ones((2, 2), np.int32))
  image, _ = _colour_of(pan)
  for seed in range(6):
    outs = {}
    for backend in ("pil", "cv2"):
      config = T.AugmentConfig(crop_size=(33, 41), min_scale=1.0, max_scale=2.0, backend=backend)
      outs[backend] = T.random_scale_crop_flip(image, pan, np.random.default_rng(seed), config,
                                               T.photometric_matrix(np.random.default_rng(seed), config, image))
    np.testing.assert_array_equal(outs["pil"][1], outs["cv2"][1])  # Labels do not depend on the backend.
    diff = np.abs(outs["pil"][0].astype(int) - outs["cv2"][0].astype(int))
    assert np.median(diff) <= 1 and diff.mean() < 3


def test_unknown_backend_is_named():
  with pytest.raises(ValueError, match="backend"):
    T.AugmentConfig(backend="magick")


def test_scale_step_quantises():
  pan = _scene()
  image, _ = _colour_of(pan)
  config = _no_photometric(crop_size=(200, 200), min_scale=0.5, max_scale=1.5, scale_step=0.5, flip_prob=0.0)
  heights = set()
  for seed in range(20):
    _, out_pan = T.random_scale_crop_flip(image, pan, np.random.default_rng(seed), config)
    heights.add(int((out_pan != VOID).any(axis=1).nonzero()[0].max()) + 1)
  assert heights <= {24, 48, 72}  # 48 * {0.5, 1, 1.5} (the void top band does not move the last row)


def test_eval_resize_and_pad():
  pan = _scene(24, 32)
  image, _ = _colour_of(pan)
  out_image, out_pan, content = T.resize_and_pad(image, pan, (33, 65))
  assert content == (33, 44)  # scale min(33/24, 65/32) = 1.375
  assert (out_pan[:, 44:] == VOID).all() and (out_image[:, 44:] == T.PAD_PIXEL).all()
  out_image, out_pan, content = T.resize_and_pad(image, pan, (33, 65), resize=False)
  assert content == (24, 32)
  np.testing.assert_array_equal(out_pan[:24, :32], pan)
  with pytest.raises(ValueError, match="does not fit the eval crop"):
    T.resize_and_pad(image, pan, (17, 65), resize=False)
  transform = T.EvalTransform((17, 65), _targets_config(), resize=False)
  with pytest.raises(ValueError, match="example 'img7': image of 24x32 does not fit"):
    transform.map({"image": image, "panoptic": pan, "name": "img7", "index": 0})


# ----------------------------------------------------------------------------------------------------------------------
# Photometric and the Grain transforms


def test_photometric_keeps_gray_gray_and_is_off_at_zero():
  rng = np.random.default_rng(0)
  gray = np.full((8, 8, 3), 100, np.uint8)
  config = T.AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.5, hue=0.2)
  for _ in range(10):
    out = T.apply_color_matrix(gray, T.photometric_matrix(rng, config, gray))
    assert np.abs(out.astype(int) - out[..., :1].astype(int)).max() <= 1  # still gray
  assert T.photometric_matrix(rng, _no_photometric(), gray) is None


def test_photometric_changes_colour_images():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  config = T.AugmentConfig(brightness=0.3, contrast=0.3, saturation=0.5, hue=0.1)
  out = T.apply_color_matrix(image, T.photometric_matrix(rng, config, image))
  assert out.dtype == np.uint8 and out.shape == image.shape and not np.array_equal(out, image)


def test_train_transform_is_deterministic_and_has_contract_keys():
  pan = _scene()
  image, _ = _colour_of(pan)
  transform = T.TrainTransform(T.AugmentConfig(crop_size=(33, 41)), _targets_config(num_slots=8, stride=4))
  a = transform.random_map({"image": image, "panoptic": pan, "name": "x", "index": 5}, np.random.default_rng(7))
  b = transform.random_map({"image": image, "panoptic": pan, "name": "x", "index": 5}, np.random.default_rng(7))
  assert sorted(a) == ["dropped_segments", "image", "index", "panoptic", "semantic", "slot_classes", "slot_ids",
                       "valid"]
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert a["image"].shape == (33, 41, 3) and a["image"].dtype == np.uint8
  assert a["panoptic"].shape == (33, 41) and a["panoptic"].dtype == np.int32
  assert a["slot_ids"].shape == a["semantic"].shape == (9, 11)
  assert a["slot_classes"].shape == (8,) and a["valid"] and a["index"] == 5


def test_eval_transform_blank_for_padding():
  transform = T.EvalTransform((17, 25), _targets_config(num_slots=4, stride=4))
  out = transform.map({"index": -1})
  assert not out["valid"] and out["index"] == -1
  assert (out["panoptic"] == VOID).all() and (out["slot_classes"] == -1).all() and (out["slot_ids"] == -1).all()
  np.testing.assert_array_equal(out["content_hw"], [0, 0])
  pan = _scene(24, 32)
  image, _ = _colour_of(pan)
  out = transform.map({"image": image, "panoptic": pan, "name": "x", "index": 3})
  assert out["valid"] and out["index"] == 3
  np.testing.assert_array_equal(out["original_hw"], [24, 32])
  np.testing.assert_array_equal(out["content_hw"], [17, 23])


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="min_scale"):
    T.AugmentConfig(min_scale=2.0, max_scale=1.0)
  with pytest.raises(ValueError, match="num_mask_slots"):
    T.TargetConfig(IS_THING, DIV, 0, 4)


def test_train_transform_names_the_example_on_bad_input():
  transform = T.TrainTransform(T.AugmentConfig(crop_size=(9, 9)), _targets_config())
  bad = {"image": np.zeros((8, 8, 3), np.uint8), "panoptic": np.zeros((8, 9), np.int32), "name": "b1", "index": 0}
  with pytest.raises(ValueError, match="example 'b1': image \\(8, 8\\) and panoptic map \\(8, 9\\) differ"):
    transform.random_map(bad, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------------------------
# Copy-paste


def test_paste_segments_pastes_every_thing_and_a_subset_keeping_labels_with_pixels():
  main = _scene()
  partner = np.full_like(main, VOID)
  partner[10:20, 5:15] = 2 * DIV + 1     # a car: pasted always
  partner[30:40, 40:50] = 3 * DIV + 1    # a person: pasted always
  partner[40:48, :] = 0 * DIV            # road: pasted in some draws, then part of the main crop's road
  image, _ = _colour_of(main)
  partner_image = np.full(image.shape, 200, np.uint8)
  seen_road = set()
  for seed in range(12):
    out_image, out = T.paste_segments(image, main, partner_image, partner, np.random.default_rng(seed), IS_THING, DIV)
    pasted = partner >= 0
    thing = partner // DIV >= 2
    # Pasted things take new instance numbers after the main crop's (cars 1, 2 -> 3; person 1 -> 2).
    assert (out[10:20, 5:15] == 2 * DIV + 3).all() and (out[30:40, 40:50] == 3 * DIV + 2).all()
    assert (out_image[thing] == 200).all()
    road_pasted = bool((out[40:48, :] == 0).all()) and bool((out_image[40:48, :] == 200).all())
    seen_road.add(road_pasted)
    if not road_pasted:
      np.testing.assert_array_equal(out[40:48], main[40:48])
    # Unpasted pixels (the partner's void) keep the main crop.
    np.testing.assert_array_equal(out[~pasted], main[~pasted])
    np.testing.assert_array_equal(out_image[~pasted], image[~pasted])
  assert seen_road == {True, False}  # The stuff subset is random: both outcomes occur.


def test_copy_paste_train_transform_is_deterministic_and_uses_the_partner():
  pan = _scene()
  image, _ = _colour_of(pan)
  partner_pan = np.full_like(pan, 3 * DIV + 1)  # One person covering the partner image.
  partner = {"image": np.full_like(image, 250), "panoptic": partner_pan, "name": "p", "index": 1}
  element = {"image": image, "panoptic": pan, "name": "m", "index": 0, "partner": partner}
  transform = T.TrainTransform(_no_photometric(crop_size=(33, 33), copy_paste=True), _targets_config())
  a = transform.random_map(dict(element), np.random.default_rng(5))
  b = transform.random_map(dict(element), np.random.default_rng(5))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  person = a["panoptic"] == 3 * DIV + 2  # The partner's person, numbered after the main crop's person 1.
  assert person.any() and (a["image"][person] == 250).all()
  plain = T.TrainTransform(_no_photometric(crop_size=(33, 33)), _targets_config())
  without = plain.random_map(dict(element), np.random.default_rng(5))
  assert not (without["image"] == 250).all(axis=-1).any()  # Off: the partner is never read.
