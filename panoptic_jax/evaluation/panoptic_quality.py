"""Panoptic quality (PQ / SQ / RQ) with panopticapi's `pq_compute` semantics, on device, with static shapes.

Inputs are canonical panoptic maps (int32 `category * label_divisor + instance`, `VOID = -1`). Every distinct value
of a map is one segment (stuff included: the metric never merges segments itself). Crowd regions have no place in
the canonical map, so the ground truth comes with an optional second map:

  gt_crowd  int32 [B, H, W]: -1 = no crowd here (the GT map decides); c >= 0 = a crowd region of category c (the GT
            map value is ignored there); `UNLISTED` (-2) = a GT pixel that is neither VOID nor a segment nor a crowd
            region that forgives false positives (panopticapi: pixels of a segment missing from `segments_info`, and
            crowd segments of a category other than its last-listed one).

Per image, panopticapi's rules (docs/metrics.md):
  * a GT segment and a predicted segment match when they have the same category, the GT is not crowd and
    IoU > 0.5 (strictly), with `union = pred_area + gt_area - intersection - |pred n GT VOID|`;
  * FN = unmatched non-crowd GT segment;
  * FP = unmatched predicted segment unless `(|pred n GT VOID| + |pred n crowd of its category|) / pred_area > 0.5`.
All comparisons are done exactly in integers (`2 * intersection > union`).

Algorithm (static shapes, no sort, no one-hots). On XLA CPU a fused pass over the maps runs at memory speed, while
scatters and gathers are serial (~1 ns per element), so every pixel is read once and only region boundaries are
scattered. Images are processed one at a time (`lax.map`), which keeps their temporaries in cache:
  1. One fused pass (a variadic reduce) reads the GT, crowd and predicted maps and gives the (GT key, predicted key)
     pair of every row of 8 pixels, or MIXED; a pass over that 8x smaller result merges 8 rows into 8x8 tiles.
  2. Weighted entries: each uniform tile (weight 64); the 8 rows of each mixed tile (weight 8 when uniform); the 8
     pixels of each mixed row (weight 1). Mixed tiles and rows are compacted to static capacities set by
     `mixed_fraction` (prefix sums as triangular matmuls, then a scatter). On region maps about 10-13% of the
     pixels become entries.
  3. Slots: per side, one scatter marks the present keys in a bitmask over the key range (uint32 words); an entry's
     slot is its key's rank, `present keys in earlier words + popcount(word & lower bits)`, so each image has at
     most `max_segments` slots per side. GT crowd regions, VOID and UNLISTED pixels are GT slots too.
  4. Scatter-adds of the weights at `gt_slot * S + pred_slot` give the joint histogram [S, S], from which areas,
     VOID and crowd overlaps and the matching follow with small dense ops.

Outputs are integers with static shapes, all per image: per-category `tp`, `fp`, `fn` and, per GT slot, the matched
pair's category, intersection and union. The host sums them and computes IoUs in float64
(`PanopticQualityAccumulator`), which is what makes `iou_sum` equal to panopticapi's to ~1e-15. Nothing is summed
across devices inside the computation: on XLA:CPU a collective makes each device's thread wait at a rendezvous, so
several batches in flight slow each other down and, with enough of them, fill the thread pool with waiting threads
and hang.

Host maps: `jax.device_put` of a numpy array copies it unless its data starts on a 64-byte boundary, in which case
JAX's CPU client aliases it (per shard too when the shards are aligned). numpy aligns to 16 bytes only, and the copy
costs more than the statistics, so build host batches with `aligned_full`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from panoptic_jax.evaluation.segment_stats import gt_keys, histogram_stats, pred_keys


__all__ = ["aligned_empty", "aligned_full", "panoptic_stats"]


# Byte alignment at which jax.device_put on CPU aliases a numpy array instead of copying it.
HOST_ALIGNMENT = 64

# Pixels are counted in TILE x TILE tiles, then rows of TILE pixels, then pixels; see `_block_entries`.
TILE = 8
# Capacity for mixed rows, as a share of the capacity for mixed tiles (mixed_fraction): on region maps about 40% of
# the rows of a mixed tile are mixed (a horizontal boundary leaves them uniform).
ROW_SHARE = 0.5
# Key pair markers of `_merge_groups` (keys are >= 0).
MIXED = -1
INIT = -2


def aligned_empty(shape: Sequence[int], dtype: np.dtype = np.int32) -> np.ndarray:
  """np.empty(shape, dtype) with its data on a HOST_ALIGNMENT-byte boundary (see the module docstring).

  `jax.device_put` on CPU then shares the memory instead of copying it: do not write to the array after that.
  """
  dtype = np.dtype(dtype)
  size = math.prod(shape) * dtype.itemsize
  raw = np.empty(size + HOST_ALIGNMENT, np.uint8)
  start = -raw.ctypes.data % HOST_ALIGNMENT
  return raw[start:start + size].view(dtype).reshape(shape)


def aligned_full(shape: Sequence[int], fill_value: int, dtype: np.dtype = np.int32) -> np.ndarray:
  """np.full(shape, fill_value, dtype) on a HOST_ALIGNMENT-byte boundary (`aligned_empty`)."""
  out = aligned_empty(shape, dtype)
  out.fill(fill_value)
  return out


def _exclusive_cumsum(x: jnp.ndarray, width: int = 32) -> jnp.ndarray:
  """Exclusive prefix sum of a float32 vector [n] of small non-negative integers, with matmuls.

  XLA CPU lowers `cumsum` to a slow windowed reduction; blocked triangular matmuls are exact (float32 sums of
  integers below 2^24) and an order of magnitude faster. The block offsets ride along as an extra matmul column so
  that the result is a matmul's output: XLA would otherwise fuse the additions into a consuming gather and redo them
  per gathered element.
  """
  n = x.shape[0]
  if n <= width:
    return x @ jnp.triu(jnp.ones((n, n), jnp.float32), 1)
  rows = -(-n // width)
  blocks = jnp.pad(x, (0, rows * width - n)).reshape(rows, width)
  offsets = _exclusive_cumsum(blocks.sum(axis=1), width)
  matrix = jnp.concatenate([jnp.triu(jnp.ones((width, width), jnp.float32), 1), jnp.ones((1, width), jnp.float32)])
  return (jnp.concatenate([blocks, offsets[:, None]], axis=1) @ matrix).reshape(-1)[:n]


def _take(values: jnp.ndarray, index: jnp.ndarray) -> jnp.ndarray:
  """values.ravel()[index] for in-bounds indices (without jnp's negative-index wrapping)."""
  return values.ravel().at[index].get(mode="promise_in_bounds")


def _compact(flags: jnp.ndarray, values: jnp.ndarray, capacity: int):
  """The values at the set flags, in order.

  Args:
    flags: bool [n].
    values: int32 [n].
    capacity: static number of values kept.

  Returns:
    kept: int32 [capacity] values at the first `capacity` set flags (0 past the count).
    used: bool [capacity] whether the entry holds a value.
    count: int32 number of set flags (more than capacity: values past it are dropped).
  """
  position = _exclusive_cumsum(flags.astype(jnp.float32)).astype(jnp.int32)
  count = position[-1] + flags[-1]
  target = jnp.where(flags, jnp.minimum(position, capacity), capacity)
  kept = jnp.zeros(capacity + 1, jnp.int32).at[target].set(values, mode="promise_in_bounds")
  return kept[:capacity], jnp.arange(capacity, dtype=jnp.int32) < count, count


def _merge_pairs(x: tuple[jnp.ndarray, jnp.ndarray], y: tuple[jnp.ndarray, jnp.ndarray]):
  """Reducer: the common (GT, predicted) key pair of two entries, MIXED when they differ; INIT is the identity."""
  (x_gt, x_pred), (y_gt, y_pred) = x, y
  same = (x_gt == y_gt) & (x_pred == y_pred)
  merged_gt = jnp.where(same, x_gt, MIXED)
  merged_pred = jnp.where(same, x_pred, MIXED)
  merged_gt = jnp.where(x_gt == INIT, y_gt, jnp.where(y_gt == INIT, x_gt, merged_gt))
  merged_pred = jnp.where(x_gt == INIT, y_pred, jnp.where(y_gt == INIT, x_pred, merged_pred))
  return merged_gt, merged_pred


def _merge_groups(gt_key: jnp.ndarray, pred_key: jnp.ndarray, axis: int):
  """The key pair of each group along `axis` if the group holds one pair, else MIXED (for both keys).

  A variadic reduce: XLA CPU reads the maps once and writes both outputs (a `jnp.all` plus selects of the group's
  first element reads them twice).
  """
  return jax.lax.reduce((gt_key, pred_key), (np.int32(INIT), np.int32(INIT)), _merge_pairs, (axis,))


def _capacities(tiles: int, mixed_fraction: float) -> tuple[int, int]:
  """Static numbers of mixed tiles and mixed rows one image may have."""
  tile_capacity = min(tiles, math.ceil(tiles * mixed_fraction))
  return tile_capacity, min(TILE * tile_capacity, math.ceil(TILE * tiles * mixed_fraction * ROW_SHARE))


def _block_entries(gt_key: jnp.ndarray, pred_key: jnp.ndarray, gt_pad: int, pred_pad: int, tile_capacity: int,
                   row_capacity: int):
  """Weighted (GT key, predicted key) entries of one image that add up to its joint pixel histogram.

  Uniform 8x8 tiles are one entry of weight 64; each mixed tile (up to tile_capacity) gives its 8 rows of 8 pixels,
  a uniform row is one entry of weight 8; each mixed row (up to row_capacity) gives its 8 pixels. Entries that stand
  for nothing (mixed tiles and rows, unused capacity) hold the pad keys, which the histogram drops.

  Args:
    gt_key, pred_key: int32 [H, W] keys, H and W multiples of TILE.
    gt_pad, pred_pad: the keys that count nowhere.
    tile_capacity, row_capacity: static.

  Returns:
    parts: [(GT keys, predicted keys, weight)] for tiles, rows and pixels, int32 [n] keys each; mixed: int32 [2]
    mixed tiles and mixed rows.
  """
  h, w = gt_key.shape
  tiles_w = w // TILE
  # Rows [H, W / TILE], then tiles [H / TILE, W / TILE], MIXED where the group holds several pairs. Only the first
  # pass reads the maps; it is memory-bound.
  row_gt, row_pred = _merge_groups(gt_key.reshape(h, tiles_w, TILE), pred_key.reshape(h, tiles_w, TILE), axis=2)
  shape = (h // TILE, TILE, tiles_w)
  tile_gt, tile_pred = (x.ravel() for x in _merge_groups(row_gt.reshape(shape), row_pred.reshape(shape), axis=1))
  tile_mixed = tile_gt == MIXED

  # The rows of the mixed tiles: positions [tile_capacity * TILE] in the row arrays.
  tile, tile_used, num_tiles = _compact(tile_mixed, jnp.arange(tile_mixed.size, dtype=jnp.int32), tile_capacity)
  row = (((tile // tiles_w * TILE)[:, None] + jnp.arange(TILE, dtype=jnp.int32)) * tiles_w
         + (tile % tiles_w)[:, None]).ravel()
  row_used = jnp.repeat(tile_used, TILE)
  rows_gt = jnp.where(row_used, _take(row_gt, row), gt_pad)
  rows_pred = jnp.where(row_used, _take(row_pred, row), pred_pad)
  row_mixed = rows_gt == MIXED

  # The pixels of the mixed rows: [row_capacity * TILE].
  mixed_row, pixel_used, num_rows = _compact(row_mixed, row, row_capacity)
  pixel_used = jnp.repeat(pixel_used, TILE)

  def row_pixels(keys):  # A gather of whole 8-pixel rows: faster than one of 8 single pixels each.
    return keys.reshape(-1, TILE).at[mixed_row].get(mode="promise_in_bounds").ravel()

  pixels_gt = jnp.where(pixel_used, row_pixels(gt_key), gt_pad)
  pixels_pred = jnp.where(pixel_used, row_pixels(pred_key), pred_pad)
  parts = [(jnp.where(tile_mixed, gt_pad, tile_gt), jnp.where(tile_mixed, pred_pad, tile_pred), TILE * TILE),
           (jnp.where(row_mixed, gt_pad, rows_gt), jnp.where(row_mixed, pred_pad, rows_pred), TILE),
           (pixels_gt, pixels_pred, 1)]
  return parts, jnp.stack([num_tiles, num_rows])


def _pack_bits(bits: jnp.ndarray) -> jnp.ndarray:
  """bool [n, 32] -> uint32 [n] words, bit l = bits[:, l].

  The bytes of each 4 booleans, read as one little-endian uint32, are gathered into 4 adjacent bits by one multiply
  (b0 + b1 2^8 + b2 2^16 + b3 2^24 times 2^24 + 2^17 + 2^10 + 2^3 puts b_i at bit 24 + i, every other product below
  bit 20 or above bit 31); 8 nibbles then make the word. A sum of 32 shifted lanes per word is several times slower.
  """
  quads = jax.lax.bitcast_convert_type(bits.astype(jnp.uint8).reshape(-1, 8, 4), jnp.uint32)  # [n, 8]
  nibbles = (quads * jnp.uint32(0x01020408)) >> 24
  return jnp.sum(nibbles << (4 * jnp.arange(8, dtype=jnp.uint32)), axis=1, dtype=jnp.uint32)


def _present_keys(entries: Sequence[jnp.ndarray], size: int, max_segments: int):
  """Ranks the keys present among `entries` with a presence bitmask: 32 keys per uint32 word, popcounts per word.

  A prefix sum over a full presence table ([size] floats) costs more than all the lookups on COCO-size images; the
  bitmask takes one pass over [size] booleans and a prefix sum over size / 32 word counts.

  Args:
    entries: int32 [n] arrays of keys in [0, size]; `size` marks padding.
    size: key range.
    max_segments: S.

  Returns:
    slot: function, int32 keys [m] in [0, size] -> int32 [m] rank among the present keys (clipped to S - 1), S for
      the padding key.
    keys: int32 [S] the present keys in increasing order, padded with `size`.
    count: int32 number of present keys.
  """
  s = max_segments
  num_words = size // 32 + 1
  present = jnp.zeros(num_words * 32, jnp.bool_)
  for part in entries:
    present = present.at[part].set(True, mode="promise_in_bounds")
  present &= jnp.arange(num_words * 32) < size  # Not the padding key.
  words = _pack_bits(present.reshape(num_words, 32))
  counts = jax.lax.population_count(words).astype(jnp.int32)
  before = _exclusive_cumsum(counts.astype(jnp.float32)).astype(jnp.int32)  # Present keys in earlier words.
  count = before[-1] + counts[-1]

  def slot(keys):
    word = keys >> 5
    below = _take(words, word) & ((jnp.uint32(1) << (keys & 31).astype(jnp.uint32)) - 1)
    rank = _take(before, word) + jax.lax.population_count(below).astype(jnp.int32)
    return jnp.where(keys == size, s, jnp.minimum(rank, s - 1))

  # Slot j's key: the last word with present keys that starts at or before slot j (a scatter-max of word indices at
  # their first slots, then a running max), and in it the lane of the (j - before)-th set bit.
  j = jnp.arange(s, dtype=jnp.int32)
  lane = jnp.arange(32, dtype=jnp.uint32)
  start = jnp.where(counts > 0, jnp.minimum(before, s), s)
  word = jax.lax.cummax(jnp.zeros(s + 1, jnp.int32).at[start].max(jnp.arange(num_words, dtype=jnp.int32),
                                                                   mode="promise_in_bounds")[:s])
  upto = jax.lax.population_count(_take(words, word)[:, None] & ((jnp.uint32(2) << lane) - 1)).astype(jnp.int32)
  position = jnp.sum(upto <= (j - _take(before, word))[:, None], axis=1, dtype=jnp.int32)
  return slot, jnp.where(j < count, word * 32 + position, size), count


def _joint_histogram(parts: Sequence[tuple[jnp.ndarray, jnp.ndarray, int]], gt_size: int, pred_size: int,
                     max_segments: int):
  """Slots and the joint slot histogram of one image's weighted key pairs.

  Each side's keys are ranked among the keys present on that side (`_present_keys`), which maps them to slots;
  scatter-adds of the weights at `gt_slot * (S + 1) + pred_slot` give the histogram.

  Args:
    parts: [(GT keys, predicted keys, weight)], int32 [n] keys in [0, size] (`size` marks padding, counted
      nowhere) and a scalar weight.
    gt_size, pred_size: key ranges.
    max_segments: S.

  Returns:
    joint: int32 [S, S]; gt_keys, pred_keys: int32 [S]; num_gt, num_pred: int32.
  """
  s = max_segments
  gt_slot, gt_keys, num_gt = _present_keys([part[0] for part in parts], gt_size, s)
  pred_slot, pred_keys, num_pred = _present_keys([part[1] for part in parts], pred_size, s)
  joint = jnp.zeros((s + 1) ** 2, jnp.int32)
  for gt_entries, pred_entries, weight in parts:
    cell = gt_slot(gt_entries) * (s + 1) + pred_slot(pred_entries)
    joint = joint.at[cell].add(weight, mode="promise_in_bounds")
  return joint.reshape(s + 1, s + 1)[:s, :s], gt_keys, pred_keys, num_gt, num_pred


def _image_histogram(gt: jnp.ndarray, pred: jnp.ndarray, crowd: jnp.ndarray | None, *, num_categories: int,
                     key_divisor: int, max_segments: int, mixed_fraction: float):
  """`_joint_histogram` of one image's [H, W] maps, plus its mixed tiles and rows [2] and their capacities [2]."""
  h, w = gt.shape
  gt_key, gt_size = gt_keys(jnp, gt, crowd, num_categories, key_divisor)
  pred_key, pred_size = pred_keys(jnp, pred, num_categories, key_divisor)

  if mixed_fraction >= 1:  # Pixel by pixel: nothing can overflow.
    parts = [(gt_key.ravel(), pred_key.ravel(), 1)]
    mixed = capacity = jnp.zeros(2, jnp.int32)
  else:
    padding = ((0, -h % TILE), (0, -w % TILE))
    gt_key = jnp.pad(gt_key, padding, constant_values=gt_size)
    pred_key = jnp.pad(pred_key, padding, constant_values=pred_size)
    tile_capacity, row_capacity = _capacities(gt_key.size // TILE ** 2, mixed_fraction)
    parts, mixed = _block_entries(gt_key, pred_key, gt_size, pred_size, tile_capacity, row_capacity)
    capacity = jnp.array([tile_capacity, row_capacity], jnp.int32)
  return *_joint_histogram(parts, gt_size, pred_size, max_segments), mixed, capacity


def panoptic_stats(gt: jnp.ndarray, pred: jnp.ndarray, gt_crowd: jnp.ndarray | None = None, *, num_categories: int,
                   label_divisor: int, max_segments: int = 128, with_confusion: bool = False,
                   mixed_fraction: float = 0.25) -> dict:
  """Per-category PQ statistics of a batch.

  Args:
    gt: int32 [B, H, W] canonical GT panoptic maps (VOID = -1).
    pred: int32 [B, H, W] canonical predicted maps (VOID = -1), same categories and label divisor.
    gt_crowd: optional int32 [B, H, W] crowd map (-1 none, c >= 0 crowd of category c, -2 UNLISTED).
    num_categories: C; categories are 0..C-1.
    label_divisor: the maps' label divisor.
    max_segments: static number of slots per image and side. GT slots hold segments, crowd regions (one per
      category), VOID and UNLISTED; predicted slots hold segments and VOID.
    with_confusion: also return the semantic confusion matrix (see below).
    mixed_fraction: static capacity for "mixed" 8x8 pixel tiles (the GT or the prediction changes value in them)
      as a share of the image's tiles, and for mixed rows of 8 pixels as half that share of its rows (region maps:
      10-30% of the tiles, 5-20% of the rows); 1 counts pixel by pixel (slower, never overflows).

  The work is jitted; images are processed one after the other (`lax.map`). When `gt` is a jax.Array whose batch
  dimension (only) is sharded over a mesh axis, each device counts its own images (`shard_map`), because the
  scatters used here would otherwise make XLA gather the batch onto every device; every output is per image and
  sharded like the batch (sum them on the host: `PanopticQualityAccumulator`).

  Returns:
    dict of int32 arrays, per image:
      tp, fp, fn: [B, C].
      match_category: [B, S] per GT slot, the category of its matched pair or -1.
      match_intersection, match_union: [B, S] the matched pair's intersection and union (0 when unmatched).
      num_gt_slots, num_pred_slots: [B] slots used; more than max_segments means the results of that image are
        invalid (`PanopticQualityAccumulator.update` raises).
      num_mixed_blocks, max_mixed_blocks: [B, 2] the image's mixed tiles and mixed rows and the compiled
        capacities (zeros when mixed_fraction >= 1); more than a capacity also means invalid results (raise
        mixed_fraction).
      confusion (with_confusion): [B, C, C + 1] pixels of GT category (row; crowd regions count as their category,
        VOID and UNLISTED are excluded) predicted as category (column; column C = predicted VOID).
  """
  mesh, axis = None, None
  sharding = getattr(gt, "sharding", None)
  if isinstance(sharding, NamedSharding) and len(sharding.spec) >= 1 and isinstance(sharding.spec[0], str) and all(
      a is None for a in sharding.spec[1:]) and gt.shape[0] % sharding.mesh.shape[sharding.spec[0]] == 0:
    mesh, axis = sharding.mesh, sharding.spec[0]
  return _panoptic_stats(gt, pred, gt_crowd, num_categories=num_categories, label_divisor=label_divisor,
                         max_segments=max_segments, with_confusion=with_confusion, mixed_fraction=mixed_fraction,
                         mesh=mesh, axis=axis)


@functools.partial(jax.jit, static_argnames=("num_categories", "label_divisor", "max_segments", "with_confusion",
                                             "mixed_fraction", "mesh", "axis"))
def _panoptic_stats(gt, pred, gt_crowd, *, num_categories, label_divisor, max_segments, with_confusion,
                    mixed_fraction, mesh, axis):
  """panoptic_stats, jitted; per device under shard_map when `mesh` is given."""
  gt = jnp.asarray(gt, jnp.int32)
  pred = jnp.asarray(pred, jnp.int32)
  crowd = None if gt_crowd is None else jnp.asarray(gt_crowd, jnp.int32)
  local = functools.partial(_stats, num_categories=num_categories, key_divisor=label_divisor,
                            max_segments=max_segments, with_confusion=with_confusion, mixed_fraction=mixed_fraction)
  if mesh is None:
    return local(gt, pred, crowd)
  return jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(axis), out_specs=PartitionSpec(axis))(gt, pred, crowd)


def _stats(gt, pred, crowd, *, num_categories: int, key_divisor: int, max_segments: int, with_confusion: bool,
           mixed_fraction: float):
  """panoptic_stats on [B, H, W] maps encoded `category * key_divisor + instance`."""
  # One image at a time: its temporaries stay in cache, and the scatters need no image offsets.
  histogram = functools.partial(_image_histogram, num_categories=num_categories, key_divisor=key_divisor,
                                max_segments=max_segments, mixed_fraction=mixed_fraction)
  joint, gt_key, pred_key, num_gt, num_pred, mixed, capacity = jax.lax.map(lambda m: histogram(*m), (gt, pred, crowd))
  out = histogram_stats(jnp, joint, gt_key, pred_key, num_categories=num_categories, key_divisor=key_divisor,
                        with_confusion=with_confusion)
  return {**out, "num_gt_slots": num_gt, "num_pred_slots": num_pred, "num_mixed_blocks": mixed,
          "max_mixed_blocks": capacity}
