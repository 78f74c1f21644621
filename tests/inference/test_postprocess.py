"""Mask-wise merge against a plain loop-based numpy version; presets (the upsampling: tests/ops/test_resize.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panoptic_jax.inference import postprocess as pp

DIVISOR = 1000


def _numpy_merge(mask_logits, class_logits, is_thing, cfg, divisor):
  """Straightforward loop version of docs/kmax.md, section 6."""
  h, w, n = mask_logits.shape
  num_classes = class_logits.shape[1] - 1
  e = np.exp(mask_logits - mask_logits.max(-1, keepdims=True))
  probs = e / e.sum(-1, keepdims=True)
  ce = np.exp(class_logits - class_logits.max(-1, keepdims=True))
  cprobs = (ce / ce.sum(-1, keepdims=True))[:, :num_classes]
  conf, cat = cprobs.max(-1), cprobs.argmax(-1)
  binary = probs > cfg.pixel_confidence
  area = binary.sum((0, 1))
  mscore = np.array([probs[..., i][binary[..., i]].mean() if area[i] else 0.0 for i in range(n)])
  rank_score = conf ** cfg.class_weight * mscore ** cfg.mask_weight
  order = np.argsort(-rank_score, kind="stable")
  canvas = np.full((h, w), -1)
  pasted_order = []
  for slot in order:
    thr = cfg.thing_threshold if is_thing[cat[slot]] else cfg.stuff_threshold
    new = binary[..., slot] & (canvas < 0)
    if conf[slot] > thr and new.sum() > cfg.overlap_threshold * area[slot]:
      canvas[new] = slot
      pasted_order.append(slot)
  panoptic = np.full((h, w), -1)
  next_instance = {}
  for slot in pasted_order:
    c = cat[slot]
    if is_thing[c]:
      region = canvas == slot
      if region.sum() < cfg.thing_area_limit:
        continue
      next_instance[c] = next_instance.get(c, 0) + 1
      panoptic[region] = c * divisor + next_instance[c]
    else:
      region = np.isin(canvas, [s for s in pasted_order if cat[s] == c])
      if region.sum() < cfg.stuff_area_limit:
        continue
      panoptic[region] = c * divisor
  return panoptic, conf * mscore, probs.reshape(-1, n) @ cprobs


@pytest.mark.parametrize("preset, low_res, image_size, block_pixels", [
    ("coco", (17, 17), (17, 17), -1),
    ("cityscapes", (17, 17), (17, 17), -1),
    ("ade20k", (17, 17), (17, 17), -1),
    ("coco", (5, 9), (17, 33), 70),  # Corners aligned (x4), blocks of 2 rows, the last one padded.
    ("cityscapes", (6, 5), (20, 16), 16),  # Half-pixel centres, one row per block.
])
def test_merge_matches_numpy(preset, low_res, image_size, block_pixels):
  """The merge of upsampled logits (any block size) equals the loop version on `upsample_logits`' output."""
  cfg = pp.get_preset(preset)
  rng = np.random.default_rng(len(preset) + low_res[0])
  b, n, c = 6, 12, 5
  is_thing = np.array([True, True, False, True, False])
  # Peaked logits so that many slots pass the thresholds; scaled area limits for tiny images.
  cfg = pp.PostprocessConfig(**{**cfg.__dict__, "thing_area_limit": min(cfg.thing_area_limit, 12),
                                "stuff_area_limit": min(cfg.stuff_area_limit, 40)})
  mask_logits = rng.normal(0, 3, (b, *low_res, n)).astype(np.float32)
  class_logits = rng.normal(0, 3, (b, n, c + 1)).astype(np.float32)
  class_logits[:, : n // 2, rng.integers(0, c, n // 2)] += 6.0
  fn = jax.jit(pp.postprocess, static_argnames=("image_size", "config", "label_divisor", "align_corners",
                                                "block_pixels"))
  out = fn(jnp.asarray(mask_logits), jnp.asarray(class_logits), image_size=image_size, is_thing=jnp.asarray(is_thing),
           config=cfg, label_divisor=DIVISOR, block_pixels=block_pixels)
  mask_logits = np.asarray(pp.upsample_logits(jnp.asarray(mask_logits), image_size))
  probs = np.asarray(jax.nn.softmax(mask_logits, axis=-1))
  assert np.any(np.sum(probs > cfg.pixel_confidence, axis=-1) == 2)  # Pixels in two binary masks are covered.
  nonvoid_seen = 0
  for i in range(b):
    ref_map, ref_score, ref_sem = _numpy_merge(mask_logits[i].astype(np.float64),
                                               class_logits[i].astype(np.float64), is_thing, cfg, DIVISOR)
    np.testing.assert_array_equal(np.asarray(out["panoptic"][i]), ref_map)
    np.testing.assert_allclose(np.asarray(out["segment_score"][i]), ref_score, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["semantic_probs"][i]).reshape(-1, c), ref_sem, rtol=1e-5,
                               atol=1e-6)
    # Valid segments are exactly the ids present in the map.
    valid = np.asarray(out["segment_valid"][i])
    ids = (np.asarray(out["segment_category"][i]) * DIVISOR + np.asarray(out["segment_instance"][i]))[valid]
    assert set(ids.tolist()) == set(np.unique(ref_map[ref_map >= 0]).tolist())
    nonvoid_seen += (ref_map >= 0).sum()
  assert nonvoid_seen > 0


def test_presets_table_and_errors():
  assert pp.get_preset("COCO").thing_area_limit == 400
  assert pp.get_preset("cityscapes").mask_weight == 0.0
  assert pp.get_preset("ade20k").stuff_area_limit == 0
  with pytest.raises(ValueError, match="unknown preset"):
    pp.get_preset("kitti")
  with pytest.raises(ValueError, match="pixel_confidence must be above 1/3.*0.3"):
    pp.PostprocessConfig(**{**pp.get_preset("coco").__dict__, "pixel_confidence": 0.3})


def test_stuff_slots_merge_and_things_numbered():
  # Three slots: two stuff slots of class 1 (left, right halves), one thing of class 0 in the middle.
  h, w, n = 4, 8, 3
  logits = np.full((h, w, n), -10.0, np.float32)
  logits[:, :3, 0] = 10.0
  logits[:, 5:, 1] = 10.0
  logits[:, 3:5, 2] = 10.0
  cls = np.full((n, 3), -10.0, np.float32)
  cls[0, 1] = cls[1, 1] = cls[2, 0] = 10.0
  cfg = pp.PostprocessConfig(0.5, 0.5, 0.8, 1.0, 1.0, 0.4, 0, 0)
  out = pp.panoptic_merge(jnp.asarray(logits), jnp.asarray(cls), jnp.array([True, False]), cfg, 256)
  expected = np.full((h, w), 256)
  expected[:, 3:5] = 1
  np.testing.assert_array_equal(np.asarray(out["panoptic"]), expected)
