"""kMaX-DeepLab mask-wise merge: mask logits + class logits -> canonical panoptic map, segment scores, class probs.

reference/kmax.md section 8 (DeepLab2 `model/post_processor/max_deeplab.py`, the PyTorch port's
`panoptic_inference`):

1. softmax over slots per pixel; a slot's binary mask is prob > pixel_confidence;
2. mask score = mean prob over the binary mask; class = argmax over non-void classes, confidence = its prob;
3. slots ranked by confidence^class_weight x mask_score^mask_weight (stable: ties keep slot order);
4. pasted in that order onto free pixels; a slot is dropped when its confidence is not above the thing / stuff
   threshold of its class, or when its still-free part is <= overlap_threshold x its binary area; all slots of one
   stuff class form one segment;
5. thing segments smaller than thing_area_limit and stuff segments (per class) smaller than stuff_area_limit
   become void.

Output map: `category * label_divisor + instance`, VOID = -1; things are numbered 1..K per class in paste order,
stuff has instance 0. Everything is jittable with static shapes (the merge is a `fori_loop` over the N slots).
Mask logits are first upsampled to the input size with `upsample_logits` (bilinear, corners aligned when the
sizes are of the `stride * k + 1` kind, e.g. odd crops).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["PostprocessConfig", "PRESETS", "get_preset", "upsample_logits", "panoptic_merge", "postprocess",
           "VOID"]

VOID = -1


@dataclasses.dataclass(frozen=True)
class PostprocessConfig:
  """Mask-wise merge thresholds (DeepLab2 kMaX configs)."""

  thing_threshold: float
  stuff_threshold: float
  overlap_threshold: float
  class_weight: float
  mask_weight: float
  pixel_confidence: float
  thing_area_limit: int
  stuff_area_limit: int


# The one table of presets (reference/kmax.md section 8).
PRESETS: dict[str, PostprocessConfig] = {
    "coco": PostprocessConfig(0.7, 0.5, 0.8, 1.0, 1.0, 0.4, 400, 6400),
    "cityscapes": PostprocessConfig(0.5, 0.3, 0.9, 1.0, 0.0, 0.4, 256, 2048),
    "ade20k": PostprocessConfig(0.4, 0.4, 0.8, 1.0, 1.0, 0.4, 0, 0),
    # The demo's 128x256 synthetic scenes: COCO's thresholds; area limits below the smallest labelled segments
    # (COCO's would remove real ones).
    "synthetic": PostprocessConfig(0.7, 0.5, 0.8, 1.0, 1.0, 0.4, 16, 64),
}


def get_preset(name: str) -> PostprocessConfig:
  """The preset called `name` (config.eval.postprocess); raises with the known names otherwise."""
  try:
    return PRESETS[name.lower()]
  except KeyError:
    raise ValueError(f"config.eval.postprocess: unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


def _axis_weights(n_in: int, n_out: int, align_corners: bool):
  """Source indices (lo, hi) and interpolation weight of hi for 1-D bilinear resizing."""
  out = jnp.arange(n_out, dtype=jnp.float32)
  if align_corners:
    pos = out * ((n_in - 1) / max(n_out - 1, 1))
  else:
    pos = jnp.clip((out + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n_in - 1)
  hi = jnp.minimum(lo + 1, n_in - 1)
  return lo, hi, pos - lo.astype(jnp.float32)


def upsample_logits(logits: jax.Array, size: tuple[int, int], align_corners: bool | None = None) -> jax.Array:
  """Bilinear resize of [B, h, w, N] to [B, H, W, N].

  align_corners=None picks corner alignment when (H - 1) and (W - 1) are multiples of (h - 1) and (w - 1) (the
  `output_stride * k + 1` crops, odd sizes) and half-pixel centres otherwise.
  """
  h, w = logits.shape[1:3]
  big_h, big_w = size
  if align_corners is None:
    align_corners = (h > 1 and w > 1 and (big_h - 1) % (h - 1) == 0 and (big_w - 1) % (w - 1) == 0)
  x = logits.astype(jnp.float32)
  lo, hi, f = _axis_weights(h, big_h, align_corners)
  x = x[:, lo] * (1.0 - f)[None, :, None, None] + x[:, hi] * f[None, :, None, None]
  lo, hi, f = _axis_weights(w, big_w, align_corners)
  return x[:, :, lo] * (1.0 - f)[None, None, :, None] + x[:, :, hi] * f[None, None, :, None]


def panoptic_merge(mask_logits: jax.Array, class_logits: jax.Array, is_thing: jax.Array,
                   config: PostprocessConfig, label_divisor: int) -> dict[str, jax.Array]:
  """Mask-wise merge for one image.

  Args:
    mask_logits: [H, W, N] slot logits at the final resolution.
    class_logits: [N, C + 1] class logits, void last.
    is_thing: [C] bool.
    config: thresholds (a PostprocessConfig; static).
    label_divisor: panoptic label divisor (static).

  Returns dict:
    panoptic [H, W] int32 (VOID = -1);
    semantic_probs [H, W, C] float32: sum over slots of mask prob x class prob (void class excluded);
    segment_slot [N] int32 (0..N-1), segment_category [N] int32, segment_instance [N] int32 (instance id in the
    map; 0 for stuff), segment_score [N] float32 (class prob x mean mask prob), segment_valid [N] bool (the slot
    contributes pixels to the returned map). Entries are per slot in slot order; stuff slots of one class share
    their (category, 0) id.
  """
  h, w, n = mask_logits.shape
  num_classes = class_logits.shape[-1] - 1
  mask_probs = jax.nn.softmax(mask_logits.astype(jnp.float32), axis=-1).reshape(h * w, n)
  class_probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :num_classes]
  conf = jnp.max(class_probs, axis=-1)
  category = jnp.argmax(class_probs, axis=-1).astype(jnp.int32)
  thing = jnp.asarray(is_thing, bool)[category]

  binary = mask_probs > config.pixel_confidence  # [P, N]
  area = jnp.sum(binary, axis=0).astype(jnp.float32)
  mask_score = jnp.sum(mask_probs * binary, axis=0) / jnp.maximum(area, 1.0)
  rank_score = conf ** config.class_weight * mask_score ** config.mask_weight
  order = jnp.argsort(-rank_score, stable=True)
  threshold = jnp.where(thing, config.thing_threshold, config.stuff_threshold)
  confident = conf > threshold

  def paste(step, state):
    canvas, kept = state
    slot = order[step]
    mine = lax.dynamic_index_in_dim(binary, slot, axis=1, keepdims=False)
    new = mine & (canvas < 0)
    ok = confident[slot] & (jnp.sum(new) > config.overlap_threshold * area[slot])
    canvas = jnp.where(new & ok, slot, canvas)
    return canvas, kept.at[slot].set(ok)

  canvas, kept = lax.fori_loop(0, n, paste, (jnp.full((h * w,), -1, jnp.int32), jnp.zeros((n,), bool)))

  # Final areas: per slot (things) and per stuff class (all slots of the class together).
  pasted = jnp.zeros((n,), jnp.float32).at[canvas].add(jnp.where(canvas >= 0, 1.0, 0.0), mode="drop")
  stuff_area = jnp.zeros((num_classes,), jnp.float32).at[category].add(jnp.where(thing, 0.0, pasted))
  big_enough = jnp.where(thing, pasted >= config.thing_area_limit,
                         stuff_area[category] >= config.stuff_area_limit)
  valid = kept & big_enough & (pasted > 0)
  # Things: 1..K per class in paste order.
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  counted = valid & thing
  earlier = (rank[None, :] < rank[:, None]) & (category[None, :] == category[:, None]) & counted[None, :]
  instance = jnp.where(thing, jnp.sum(earlier, axis=1) + 1, 0).astype(jnp.int32)
  slot_label = jnp.where(valid, category * label_divisor + instance, VOID)
  panoptic = jnp.where(canvas >= 0, slot_label[jnp.clip(canvas, 0, n - 1)], VOID).reshape(h, w)

  semantic_probs = (mask_probs @ class_probs).reshape(h, w, num_classes)
  return {
      "panoptic": panoptic.astype(jnp.int32),
      "semantic_probs": semantic_probs,
      "segment_slot": jnp.arange(n, dtype=jnp.int32),
      "segment_category": category,
      "segment_instance": jnp.where(valid, instance, 0),
      "segment_score": conf * mask_score,
      "segment_valid": valid,
  }


def postprocess(mask_logits: jax.Array, class_logits: jax.Array, image_size: tuple[int, int], is_thing: jax.Array,
                config: PostprocessConfig, label_divisor: int,
                align_corners: bool | None = None) -> dict[str, jax.Array]:
  """Batched: upsample [B, h, w, N] mask logits to `image_size`, then `panoptic_merge` per image.

  `image_size`, `config`, `label_divisor` and `align_corners` are static under jit. Outputs carry a leading
  batch axis (see `panoptic_merge`).
  """
  logits = upsample_logits(mask_logits, image_size, align_corners)
  merge = lambda m, c: panoptic_merge(m, c, is_thing, config, label_divisor)  # noqa: E731
  return jax.vmap(merge)(logits, class_logits)
