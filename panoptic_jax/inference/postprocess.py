"""kMaX-DeepLab mask-wise merge: mask logits + class logits -> canonical panoptic map, segment scores, class probs.

docs/kmax.md, section 6 (DeepLab2 `model/post_processor/max_deeplab.py`, the PyTorch port's
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
stuff has instance 0. Everything is jittable with static shapes (the merge is a `fori_loop` over the N slots, on an
[N, N] table: see `panoptic_merge`).
Mask logits are upsampled to the input size as `upsample_logits` does (bilinear, corners aligned when the sizes are
of the `stride * k + 1` kind, e.g. odd crops), block by block together with the softmax (`_pixel_slots`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from panoptic_jax import ops
from panoptic_jax.ops import resize

__all__ = ["PostprocessConfig", "PRESETS", "get_preset", "upsample_logits", "panoptic_merge", "postprocess",
           "VOID"]

VOID = -1
CPU_BLOCK_PIXELS = 4096  # Pixels per block of the per-pixel stage on CPU (see `_pixel_slots`).


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

  def __post_init__(self):
    if not self.pixel_confidence > 1 / 3:
      raise ValueError(f"PostprocessConfig.pixel_confidence must be above 1/3 (the merge relies on no pixel lying in "
                       f"three binary slot masks); found {self.pixel_confidence}")


# The one table of presets (docs/kmax.md, section 6).
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


def upsample_logits(logits: jax.Array, size: tuple[int, int], align_corners: bool | None = None) -> jax.Array:
  """Bilinear resize of [B, h, w, N] to [B, H, W, N] in float32 (`ops.resize_bilinear`; `_pixel_slots` computes
  the same floats block by block)."""
  return resize.resize_bilinear(logits.astype(jnp.float32), size, align_corners)


def _mask_slots(logits: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The (at most two) slots whose binary mask holds each pixel.

  A slot's binary mask is prob > pixel_confidence, i.e. logit > threshold = logsumexp(logits) + log(pixel_confidence),
  and since pixel_confidence > 1/3 no pixel is in three (their probabilities would sum to more than 1). One matmul of
  the binary masks with the columns (1, s + 1, (s + 1)^2) gives each pixel's count n, sum a + b and sum of squares
  a^2 + b^2 of its slots (shifted by one), from which a and b follow exactly: b - a = sqrt(2 (a^2 + b^2) - (a + b)^2).
  It reads the [P, N] logits once; reductions over the slot axis (argmax, top_k) cost 2-8x more on XLA:CPU.

  Args:
    logits: [P, N] per-pixel slot logits.
    threshold: [P, 1].

  Returns:
    int32 [P, 2]: the pixel's slots in increasing order, N where it has fewer.
  """
  n = logits.shape[1]
  shifted = jnp.arange(1, n + 1, dtype=jnp.float32)
  columns = jnp.stack([jnp.ones_like(shifted), shifted, shifted * shifted], axis=1)  # [N, 3]
  count, total, squares = jnp.moveaxis(jnp.where(logits > threshold, 1.0, 0.0) @ columns, 1, 0)
  gap = jnp.sqrt(jnp.maximum(2.0 * squares - total * total, 0.0))  # b - a; exact (integers below 2^24).
  low = jnp.where(count == 2, (total - gap) / 2, total).astype(jnp.int32) - 1
  high = jnp.where(count == 2, (total + gap) / 2, 0).astype(jnp.int32) - 1
  return jnp.stack([jnp.where(low >= 0, low, n), jnp.where(high >= 0, high, n)], axis=1)


def _pixel_slots(mask_logits: jax.Array, size: tuple[int, int], align_corners: bool, pixel_confidence: float,
                 class_probs: jax.Array, block_pixels: int | None):
  """Upsampled softmax masks, reduced per pixel: its (at most two) binary-mask slots, their probabilities and the
  per-pixel class probabilities, computed over blocks of output rows.

  Why blocks: at 1281x1281 with 128 slots, every full-resolution [P, N] array is 840 MB, and each pass over one
  (upsampling, softmax, the mask test) is bound by memory bandwidth on CPU. A block of ~4k pixels keeps its
  [rows * W, N] logits in cache from the upsampling to the per-pixel outputs (`lax.map` over blocks). No probability
  array is written either: the mask test compares the logit with its pixel's logsumexp. The width is resized once,
  on the h input rows ([h, W, N], a quarter of the full-resolution array at stride 4), so a block only blends two of
  those rows per output row rather than resizing the width again for every output row.

  Args:
    mask_logits: [h, w, N] slot logits.
    size: (H, W) output size.
    align_corners: upsampling convention (see `upsample_logits`).
    pixel_confidence: binary-mask threshold on the slot probability.
    class_probs: [N, C] per-slot class probabilities (void excluded).
    block_pixels: pixels per block (whole rows; at least one); None: the whole image in one block.

  Returns:
    slots int32 [P, 2] (`_mask_slots`), probs float32 [P, 2] their probabilities (undefined where the slot is N),
    semantic_probs float32 [P, C] = mask probabilities @ class_probs; P = H * W in row-major order.
  """
  (h, _, n), (big_h, big_w) = mask_logits.shape, size
  rows_per_block = big_h if block_pixels is None else min(big_h, max(1, block_pixels // big_w))
  num_blocks = -(-big_h // rows_per_block)
  lo, hi, frac = (jnp.pad(jnp.asarray(a), (0, num_blocks * rows_per_block - big_h)).reshape(num_blocks, rows_per_block)
                  for a in resize.taps(h, big_h, align_corners))
  wide = resize.resize_axis(mask_logits.astype(jnp.float32), 1, big_w, align_corners)  # [h, W, N]
  log_confidence = jnp.log(jnp.float32(pixel_confidence))

  def block(rows):
    # The rows of `upsample_logits`, same arithmetic.
    logits = resize.lerp_along(wide, 0, *rows).reshape(-1, n)  # [rows * W, N]
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    slots = _mask_slots(logits, lse + log_confidence)
    probs = jnp.exp(jnp.take_along_axis(logits, jnp.minimum(slots, n - 1), axis=1) - lse)
    return slots, probs, jnp.exp(logits - lse) @ class_probs

  slots, probs, semantic = lax.map(block, (lo, hi, frac))
  flat = lambda x: x.reshape(-1, x.shape[-1])[:big_h * big_w]  # noqa: E731
  return flat(slots), flat(probs), flat(semantic)


def panoptic_merge(mask_logits: jax.Array, class_logits: jax.Array, is_thing: jax.Array,
                   config: PostprocessConfig, label_divisor: int, image_size: tuple[int, int] | None = None,
                   align_corners: bool | None = None, block_pixels: int | None = -1) -> dict[str, jax.Array]:
  """Mask-wise merge for one image, from mask logits at any resolution.

  The mask logits are upsampled to `image_size` as `upsample_logits` does, block by block together with the softmax
  and the binary-mask test (`_pixel_slots`); no full-resolution [H, W, N] array is formed. The paste loop of the
  reference runs over the N slots, each step over every pixel. Here a pixel is in at most two binary masks
  (`_mask_slots`), so a slot's still-free area when its turn comes is its area minus the pixels it shares with the
  slots pasted before it: the loop runs on the [N, N] table of shared pixels, and each pixel then goes to the first
  pasted slot (in paste order) among its two.

  Args:
    mask_logits: [h, w, N] slot logits.
    class_logits: [N, C + 1] class logits, void last.
    is_thing: [C] bool.
    config: thresholds (a PostprocessConfig; static).
    label_divisor: panoptic label divisor (static).
    image_size: (H, W) output size (static); None: (h, w), no upsampling.
    align_corners: upsampling convention (static; see `upsample_logits`).
    block_pixels: pixels per block of the per-pixel stage (static); None: one block; -1: CPU_BLOCK_PIXELS on CPU, one
      block on accelerators.

  Returns dict:
    panoptic [H, W] int32 (VOID = -1);
    semantic_probs [H, W, C] float32: sum over slots of mask prob x class prob (void class excluded; computed only
    when used: XLA drops it otherwise, ~15 GFLOP at 641x641 with 133 classes);
    segment_slot [N] int32 (0..N-1), segment_category [N] int32, segment_instance [N] int32 (instance id in the
    map; 0 for stuff), segment_score [N] float32 (class prob x mean mask prob), segment_valid [N] bool (the slot
    contributes pixels to the returned map). Entries are per slot in slot order; stuff slots of one class share
    their (category, 0) id.
  """
  h, w, n = mask_logits.shape
  image_size = (h, w) if image_size is None else tuple(image_size)
  if align_corners is None:
    align_corners = resize.corners_aligned((h, w), image_size)
  num_classes = class_logits.shape[-1] - 1
  class_probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[:, :num_classes]
  conf = jnp.max(class_probs, axis=-1)
  category = jnp.argmax(class_probs, axis=-1).astype(jnp.int32)
  thing = jnp.asarray(is_thing, bool)[category]

  pixel_slots = lambda blocks: lambda m, c: _pixel_slots(  # noqa: E731
      m, image_size, align_corners, config.pixel_confidence, c, blocks)
  if block_pixels == -1:  # Cache-sized blocks on CPU; accelerators take the whole image at once.
    per_pixel = ops.by_platform(mask_logits, class_probs, cpu=pixel_slots(CPU_BLOCK_PIXELS), default=pixel_slots(None))
  else:
    per_pixel = pixel_slots(block_pixels)(mask_logits, class_probs)
  slots, probs, semantic_probs = per_pixel  # [P, 2], [P, 2], [P, C]
  area = jnp.zeros((n + 1,), jnp.int32).at[slots.ravel()].add(1)[:n]
  mask_score = jnp.zeros((n + 1,), jnp.float32).at[slots.ravel()].add(probs.ravel())[:n] / jnp.maximum(area, 1)
  rank_score = conf ** config.class_weight * mask_score ** config.mask_weight
  order = jnp.argsort(-rank_score, stable=True)
  threshold = jnp.where(thing, config.thing_threshold, config.stuff_threshold)
  confident = conf > threshold
  # shared[s, t]: pixels in the binary masks of both s and t (the row and column N of single-mask pixels dropped).
  pairs = jnp.zeros(((n + 1) * (n + 1),), jnp.int32).at[slots[:, 0] * (n + 1) + slots[:, 1]].add(1)
  pairs = pairs.reshape(n + 1, n + 1)[:n, :n]
  shared = pairs + pairs.T

  def paste(step, kept):
    slot = order[step]
    free = area[slot] - jnp.sum(jnp.where(kept, shared[slot], 0))  # Not taken by a slot pasted before.
    return kept.at[slot].set(confident[slot] & (free > config.overlap_threshold * area[slot]))

  kept = lax.fori_loop(0, n, paste, jnp.zeros((n,), bool))
  rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  paste_rank = jnp.append(jnp.where(kept, rank, n), n)  # [N + 1]; N: not pasted (or no slot).
  first = jnp.min(paste_rank[slots], axis=1)
  canvas = jnp.where(first < n, order[jnp.minimum(first, n - 1)], -1)  # [P] the pixel's slot or -1.

  # Final areas: per slot (things) and per stuff class (all slots of the class together).
  pasted = jnp.zeros((n,), jnp.float32).at[canvas].add(jnp.where(canvas >= 0, 1.0, 0.0), mode="drop")
  stuff_area = jnp.zeros((num_classes,), jnp.float32).at[category].add(jnp.where(thing, 0.0, pasted))
  big_enough = jnp.where(thing, pasted >= config.thing_area_limit,
                         stuff_area[category] >= config.stuff_area_limit)
  valid = kept & big_enough & (pasted > 0)
  # Things: 1..K per class in paste order.
  counted = valid & thing
  earlier = (rank[None, :] < rank[:, None]) & (category[None, :] == category[:, None]) & counted[None, :]
  instance = jnp.where(thing, jnp.sum(earlier, axis=1) + 1, 0).astype(jnp.int32)
  slot_label = jnp.where(valid, category * label_divisor + instance, VOID)
  panoptic = jnp.where(canvas >= 0, slot_label[jnp.clip(canvas, 0, n - 1)], VOID).reshape(image_size)
  return {
      "panoptic": panoptic.astype(jnp.int32),
      "semantic_probs": semantic_probs.reshape(*image_size, num_classes),
      "segment_slot": jnp.arange(n, dtype=jnp.int32),
      "segment_category": category,
      "segment_instance": jnp.where(valid, instance, 0),
      "segment_score": conf * mask_score,
      "segment_valid": valid,
  }


def postprocess(mask_logits: jax.Array, class_logits: jax.Array, image_size: tuple[int, int], is_thing: jax.Array,
                config: PostprocessConfig, label_divisor: int,
                align_corners: bool | None = None, block_pixels: int | None = -1) -> dict[str, jax.Array]:
  """Batched `panoptic_merge` of [B, h, w, N] mask logits upsampled to `image_size`.

  `image_size`, `config`, `label_divisor`, `align_corners` and `block_pixels` are static under jit. Outputs carry a
  leading batch axis (see `panoptic_merge`).
  """
  merge = lambda m, c: panoptic_merge(m, c, is_thing, config, label_divisor, image_size, align_corners,  # noqa: E731
                                      block_pixels)
  return jax.vmap(merge)(mask_logits, class_logits)
