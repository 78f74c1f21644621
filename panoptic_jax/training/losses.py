"""kMaX-DeepLab training losses: Hungarian matching, PQ-style loss, mask-ID CE, instance discrimination, semantic CE.

Follows DeepLab2 (`model/loss/max_deeplab_loss.py`, `base_loss.py`) and the authors' PyTorch port
(`kmax_deeplab/modeling/criterion.py`, `matcher.py`); see docs/kmax.md, section 5.

Inputs (all static shapes; B images, N predicted mask slots, M ground-truth slots, C classes):

  outputs = {
    "mask_logits":   [B, h, w, N] float   per-pixel logits over the N slots,
    "class_logits":  [B, N, C + 1] float  per-slot class logits, void last,
    "pixel_feature": [B, h, w, D] float   pixel embeddings (L2-normalised here again; harmless if already),
    "semantic_logits": [B, hs, ws, C or C + 1] float   optional auxiliary semantic head (final output only),
    "aux_outputs": [dict with mask_logits, class_logits, pixel_feature, ...]   optional deep supervision (mask
                   logits at [h, w]; pixel features may be coarser: upsampled at the sampled pixels only),
  }
  batch = {
    "slot_ids":     [B, H, W] int   ground-truth slot (0..M-1) of every pixel; -1 = void (ignore),
    "slot_classes": [B, M] int      class (0..C-1) of every ground-truth slot; -1 = empty slot,
    "semantic":     [B, hs, ws] int optional semantic labels (-1 void); default: slot_classes[slot_ids],
    "valid":        [B] bool        optional; False marks padding images, left out of every batch mean,
  }

Ground truth given at a finer resolution than an output (H, W) vs (h, w) is strided-downsampled like DeepLab2's
`strided_downsample` (stride (H - 1) // (h - 1), so `output_stride * k + 1` crops align corners). A slot whose
area is zero at the output resolution counts as empty, as in DeepLab2.

Matching: per image on the final output, cost[m, n] = -(dice(gt_m, softmax_n) x p_n(class of gt_m)) with void pixels
zeroed in the prediction; rows of empty slots are -999 when M <= N and +999 when M > N (DeepLab2's square-padding
convention; here the rectangular problem is solved directly, which has the same optimum and keeps float32
precision). The matching and the stop-gradient weights derived from the final output (matched dice, matched class
probability, overlap with void) are reused for every auxiliary output, as in the PyTorch port.

When M > N some ground-truth masks stay unmatched: their pixels are ignored by the mask-ID CE but still count as
non-void for the dice term and the void-overlap weights, and instance discrimination always uses all ground-truth
masks (it needs no matching). `weights` (a frozen LossConfig) is static: close over it or mark it static under jit.

Reductions follow DeepLab2: per image `sum(loss) / max(1, count(loss != 0))`, then mean over the batch; the dice
term sums over slots and scales by alpha / N (0.75 / N). Everything is pure and jittable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from panoptic_jax import ops
from panoptic_jax.training.matching import linear_sum_assignment

__all__ = ["LossConfig", "kmax_losses", "match_final_output", "MatchTargets", "strided_downsample"]

_MATCHING_NEGATIVE = -999.0
_MATCHING_POSITIVE = 999.0
_SOFTMAX_MASKING = -99999.0
_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss weights and hyper-parameters (DeepLab2 kMaX defaults; field names match `config.loss`)."""

  pq_weight: float = 3.0
  mask_id_weight: float = 0.3
  instance_weight: float = 1.0
  semantic_weight: float = 1.0
  instance_temperature: float = 1.5  # Gumbel sampling temperature on log(1 / area); Cityscapes 0.6.
  instance_sample_k: int = 4096  # Pixels sampled for instance discrimination (capped at h * w).
  instance_similarity_temperature: float = 0.3  # Cosine similarity is divided by this.
  semantic_topk: float = 1.0  # Fraction of hardest pixels kept in the semantic CE (Cityscapes 0.2).
  focal_alpha: float = 0.75  # Positive slots weighted alpha, void slots 1 - alpha; gamma is 0.
  weight_floor: float = 1e-5  # Floor of the stop-gradient dice / class-probability weights.


def strided_downsample(labels: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Downsamples [B, H, W] labels to [B, h, w] by striding (DeepLab2's strided_downsample)."""
  big_h, big_w = labels.shape[1:3]
  h, w = size
  if (big_h, big_w) == (h, w):
    return labels
  sh = (big_h - 1) // max(h - 1, 1)
  sw = (big_w - 1) // max(w - 1, 1)
  out = labels[:, ::max(sh, 1), ::max(sw, 1)][:, :h, :w]
  if out.shape[1:3] != (h, w):
    raise ValueError(f"ground truth of size {big_h}x{big_w} cannot be strided down to the output size {h}x{w}")
  return out


def _batch_mean(per_image: jax.Array, image_weight: jax.Array) -> jax.Array:
  """[B] -> scalar: mean over the valid images (weight 1), padding images (weight 0) excluded."""
  return jnp.sum(per_image * image_weight) / jnp.maximum(jnp.sum(image_weight), 1.0)


def _per_image_mean(loss: jax.Array, image_weight: jax.Array) -> jax.Array:
  """[B, ...] -> scalar: per image sum / max(1, number of non-zero entries), then the mean over valid images."""
  loss = loss.reshape(loss.shape[0], -1)
  count = jnp.maximum(jnp.sum((loss != 0.0).astype(loss.dtype), axis=1), 1.0)
  return _batch_mean(jnp.sum(loss, axis=1) / count, image_weight)


def _softmax_ce(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Cross-entropy with a (possibly soft or all-zero) target distribution over the last axis."""
  return -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)


@dataclasses.dataclass(frozen=True)
class MatchTargets:
  """Everything the losses need from the ground truth and the final-output matching (no gradients)."""

  gt_masks: jax.Array  # [B, P, M] one-hot ground-truth mask of each pixel (empty slots and void pixels zero).
  slot_target: jax.Array  # [B, P, N] one-hot of the matched ground-truth mask of each pixel, per predicted slot.
  pixel_non_void: jax.Array  # [B, P] 1.0 where the pixel belongs to a (non-empty) ground-truth mask.
  slot_class: jax.Array  # [B, N] int: class of the matched ground truth, C (void) for unmatched slots.
  class_weight: jax.Array  # [B, N] matched dice (positives) or overlap with void (negatives), floored.
  dice_weight: jax.Array  # [B, N] matched class probability (floored) for positives, 0 for unmatched.
  matched_slot: jax.Array  # [B, M] int: predicted slot matched to each ground-truth slot, -1 if none.
  image_weight: jax.Array  # [B] 1.0 for real images, 0.0 for padding images (batch["valid"] False).


jax.tree_util.register_dataclass(
    MatchTargets,
    data_fields=[f.name for f in dataclasses.fields(MatchTargets)],
    meta_fields=[],
)


def _gt_one_hot(slot_ids: jax.Array, slot_classes: jax.Array, size: tuple[int, int]):
  """Ground-truth masks at the output size: one-hot [B, P, M] (empty slots zeroed) and validity [B, M]."""
  num_gt = slot_classes.shape[1]
  ids = strided_downsample(slot_ids, size).reshape(slot_ids.shape[0], -1)
  one_hot = jax.nn.one_hot(ids, num_gt, dtype=jnp.float32)  # -1 (void) -> all zeros.
  area = jnp.sum(one_hot, axis=1)
  valid = (slot_classes >= 0) & (area > 0.5)
  return one_hot * valid[:, None, :].astype(jnp.float32), valid


def match_final_output(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                       config: LossConfig = LossConfig()) -> MatchTargets:
  """Hungarian matching on the final output and the stop-gradient targets derived from it."""
  mask_logits = jax.lax.stop_gradient(outputs["mask_logits"].astype(jnp.float32))
  class_logits = jax.lax.stop_gradient(outputs["class_logits"].astype(jnp.float32))
  b, h, w, n = mask_logits.shape
  num_classes = class_logits.shape[-1] - 1
  slot_classes = batch["slot_classes"].astype(jnp.int32)
  num_gt = slot_classes.shape[1]

  gt, valid = _gt_one_hot(batch["slot_ids"], slot_classes, (h, w))  # [B, P, M], [B, M]
  non_void = jnp.sum(gt, axis=-1)  # [B, P]
  probs = jax.nn.softmax(mask_logits.reshape(b, h * w, n), axis=-1)  # [B, P, N]
  probs_nv = probs * non_void[..., None]

  # Dice between every ground-truth mask and every predicted slot (void pixels removed from the prediction).
  inter = jnp.einsum("bpm,bpn->bmn", gt, probs_nv)
  denom = (jnp.sum(gt, axis=1)[:, :, None] + jnp.sum(probs_nv, axis=1)[:, None, :]) / 2.0
  dice = inter / (denom + _EPS)
  class_probs = jax.nn.softmax(class_logits, axis=-1)[..., :num_classes]  # [B, N, C]
  gt_class_one_hot = jax.nn.one_hot(jnp.where(valid, slot_classes, -1), num_classes, dtype=jnp.float32)
  class_sim = jnp.einsum("bmc,bnc->bmn", gt_class_one_hot, class_probs)

  pad = _MATCHING_NEGATIVE if n >= num_gt else _MATCHING_POSITIVE
  cost = jnp.where(valid[:, :, None], -dice * class_sim, pad)
  rows, cols = jax.vmap(linear_sum_assignment)(cost)  # [B, min(M, N)]
  bidx = jnp.arange(b)[:, None]
  perm = jnp.zeros((b, num_gt, n), jnp.float32).at[bidx, rows, cols].set(1.0)
  perm = perm * valid[:, :, None].astype(jnp.float32)  # [B, M, N]: matched (ground truth, slot) pairs.

  positive = jnp.sum(perm, axis=1)  # [B, N]
  matched_dice = jnp.sum(dice * perm, axis=1)  # [B, N]
  matched_class_prob = jnp.sum(class_sim * perm, axis=1)  # [B, N]
  slot_class = jnp.einsum("bmn,bm->bn", perm, slot_classes.astype(jnp.float32))
  slot_class = jnp.where(positive > 0, jnp.round(slot_class), num_classes).astype(jnp.int32)
  # Overlap of each predicted slot with the void region (intersection over prediction).
  void_ratio = jnp.sum(probs * (1.0 - non_void)[..., None], axis=1) / (jnp.sum(probs, axis=1) + _EPS)
  floor = config.weight_floor
  class_weight = jnp.where(positive > 0, jnp.maximum(matched_dice, floor), jnp.maximum(void_ratio, floor))
  dice_weight = positive * jnp.maximum(matched_class_prob, floor)
  slot_target = jnp.einsum("bpm,bmn->bpn", gt, perm)
  matched_slot = jnp.where(jnp.sum(perm, axis=2) > 0, jnp.argmax(perm, axis=2), -1).astype(jnp.int32)
  return MatchTargets(gt_masks=gt, slot_target=slot_target, pixel_non_void=non_void,
                      slot_class=slot_class, class_weight=class_weight, dice_weight=dice_weight,
                      matched_slot=matched_slot, image_weight=_image_weight(batch, b))


def pq_class_loss(class_logits: jax.Array, targets: MatchTargets, alpha: float = 0.75) -> jax.Array:
  """Focal-style CE (gamma 0) toward the matched class or void, weighted by alpha and the PQ weights."""
  num_outputs = class_logits.shape[-1]
  one_hot = jax.nn.one_hot(targets.slot_class, num_outputs, dtype=jnp.float32)
  ce = _softmax_ce(class_logits.astype(jnp.float32), one_hot)
  is_void = targets.slot_class == num_outputs - 1
  alpha_weight = jnp.where(is_void, 1.0 - alpha, alpha)
  return _per_image_mean(ce * alpha_weight * targets.class_weight, targets.image_weight)


def pq_dice_loss(mask_logits: jax.Array, targets: MatchTargets, alpha: float = 0.75) -> jax.Array:
  """Dice between softmax-over-slots masks (void pixels removed) and matched masks, weighted by class prob."""
  b, h, w, n = mask_logits.shape
  probs = jax.nn.softmax(mask_logits.astype(jnp.float32).reshape(b, h * w, n), axis=-1)
  probs = probs * targets.pixel_non_void[..., None]
  inter = 2.0 * jnp.sum(probs * targets.slot_target, axis=1) + 1.0
  denom = jnp.sum(probs, axis=1) + jnp.sum(targets.slot_target, axis=1) + 1.0
  loss = (1.0 - inter / denom) * targets.dice_weight  # [B, N]
  return _batch_mean(jnp.sum(loss, axis=1), targets.image_weight) * (alpha / n)


def mask_id_loss(mask_logits: jax.Array, targets: MatchTargets) -> jax.Array:
  """Per-pixel softmax CE over slots toward the matched slot; void pixels weigh 0."""
  b, h, w, n = mask_logits.shape
  ce = _softmax_ce(mask_logits.astype(jnp.float32).reshape(b, h * w, n), targets.slot_target)
  return _per_image_mean(ce * targets.pixel_non_void, targets.image_weight)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def similarity_logsumexp(feature: jax.Array, temperature: float) -> jax.Array:
  """`[B, K, D] -> [B, K]`: `logsumexp_j (f_k . f_j / T)`.

  Shifted by each image's largest similarity, `m = max_k |f_k|^2 / T` (no `f_k . f_j` exceeds it, by
  Cauchy-Schwarz), so `E = exp(S - m)` of the symmetric `S = F F^T / T` is symmetric and in (0, 1], and no row
  maximum is needed. For the unit-norm features of the loss, `E_kk = 1` and `E >= exp(-2 / T)`.

  The backward is written out from `E`, kept from the forward: with `r_k = sum_j E_kj` and `a = c / r` for a
  cotangent `c`, `dF = M F / T` with `M_kj = E_kj (a_k + a_j)`: elementwise in `E` (no exponential), one matmul.
  Autodiff takes two matmuls (one per operand of `F F^T`); summing `G + G^T` first needs a transpose of the `[K, K]`
  matrix, which XLA:CPU does slowly.
  """
  return _similarity_logsumexp_fwd(feature, temperature)[0]


def _similarity_logsumexp_fwd(feature, temperature):
  shift = jnp.max(jnp.sum(feature * feature, axis=-1), axis=-1) / temperature  # [B]
  # 1 / T scales the [K, D] operand, not the [K, K] product (a pass over 2 x 4096^2 values less per loss).
  weights = jnp.exp(jnp.einsum("bkd,bjd->bkj", feature / temperature, feature) - shift[:, None, None])
  total = jnp.sum(weights, axis=-1)
  return jnp.log(total) + shift[:, None], (feature, weights, total)


def _similarity_logsumexp_bwd(temperature, residuals, cotangent):
  feature, weights, total = residuals
  scale = cotangent / total
  mixed = weights * (scale[:, :, None] + scale[:, None, :])
  return (jnp.einsum("bkj,bjd->bkd", mixed, feature) / temperature,)


similarity_logsumexp.defvjp(_similarity_logsumexp_fwd, _similarity_logsumexp_bwd)


def instance_discrimination_loss(pixel_feature: jax.Array, targets: MatchTargets, rng: jax.Array,
                                 sample_k: int = 4096, sample_temperature: float = 1.5,
                                 similarity_temperature: float = 0.3,
                                 grid_hw: tuple[int, int] | None = None) -> jax.Array:
  """Pixel-wise instance discrimination on Gumbel-top-k sampled pixels (small masks sampled more often).

  Per sampled pixel k (non-void), with similarities `s_kj = f_k . f_j / T` and target `t_kj = [id_j == id_k] / n_k`
  (n_k sampled pixels share k's mask): `CE_k = logsumexp_j s_kj - sum_j t_kj s_kj`, and the second term is
  `f_k . (sum of the sampled features of k's mask) / (T n_k)`. So only the log-sum-exp needs the `[K, K]`
  similarities; the target matrix is never built (same value as the dense soft-target cross-entropy).

  Pixels are sampled on the `grid_hw` grid of the masks (default: the feature's own size). Coarser features (the
  auxiliary outputs') are upsampled bilinearly (`ops.resize_bilinear`'s rule) at the sampled pixels only, and
  features are L2-normalised after sampling: the same values as resizing and normalising the whole map first.
  """
  b, fh, fw, d = pixel_feature.shape
  h, w = grid_hw or (fh, fw)
  p = h * w
  gt_masks = targets.gt_masks
  if gt_masks.shape[1] != p:
    raise ValueError(f"instance discrimination: the pixel grid is {h}x{w} but the masks have {gt_masks.shape[1]} "
                     f"pixels")
  area = jnp.sum(gt_masks, axis=1)  # [B, M]
  pixel_area = jnp.einsum("bpm,bm->bp", gt_masks, area)
  logits = jnp.log(p / jnp.maximum(pixel_area, 1.0)) * sample_temperature
  logits = logits + (1.0 - targets.pixel_non_void) * _SOFTMAX_MASKING
  # GT masks do not overlap, so the target affinity is "same mask id".
  mask_id = jnp.where(jnp.sum(gt_masks, axis=-1) > 0, jnp.argmax(gt_masks, axis=-1), -1)  # [B, P]
  if sample_k >= p:
    # Every pixel is taken: the loss does not depend on the order of the samples, so skip top-k and gathers.
    ids, feat = mask_id, ops.resize_bilinear(pixel_feature, (h, w)).reshape(b, p, d)
  else:
    gumbel = jax.random.gumbel(rng, logits.shape, jnp.float32)
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(logits + gumbel), sample_k)  # [B, K]
    ids = jnp.take_along_axis(mask_id, idx, axis=1)  # [B, K]
    feat = ops.sample_bilinear(pixel_feature, idx // w, idx % w, (h, w))  # [B, K, D]
  feat = feat.astype(jnp.float32)
  feat = feat / jnp.maximum(jnp.linalg.norm(feat, axis=-1, keepdims=True), 1e-12)
  member = jax.nn.one_hot(ids, gt_masks.shape[-1], dtype=jnp.float32)  # [B, K, M]; void pixels -> zeros.
  mask_sum = jnp.einsum("bkm,bkd->bmd", member, feat)  # [B, M, D] sampled features summed per mask.
  same = jnp.einsum("bkd,bkm,bmd->bk", feat, member, mask_sum)  # sum_j [id_j == id_k] f_k . f_j
  count = jnp.einsum("bkm,bm->bk", member, jnp.sum(member, axis=1))  # n_k (0 for void pixels)
  log_norm = similarity_logsumexp(feat, similarity_temperature)
  ce = jnp.where(count > 0, log_norm - same / (similarity_temperature * jnp.maximum(count, 1.0)), 0.0)
  return _per_image_mean(ce, targets.image_weight)


def semantic_loss(semantic_logits: jax.Array, semantic: jax.Array, topk: float = 1.0,
                  image_weight: jax.Array | None = None) -> jax.Array:
  """Softmax CE on the auxiliary semantic logits; labels -1 (or >= num classes) are void; optional top-k."""
  b, h, w, c = semantic_logits.shape
  labels = strided_downsample(semantic, (h, w)).reshape(b, h * w)
  one_hot = jax.nn.one_hot(labels, c, dtype=jnp.float32)  # void (-1) -> zeros -> loss 0.
  ce = _softmax_ce(semantic_logits.astype(jnp.float32).reshape(b, h * w, c), one_hot)
  if topk < 1.0:
    k = max(1, int(math.ceil(topk * h * w)))
    ce, _ = jax.lax.top_k(ce, k)
  return _per_image_mean(ce, jnp.ones((b,), jnp.float32) if image_weight is None else image_weight)


def _image_weight(batch: Mapping[str, jax.Array], batch_size: int) -> jax.Array:
  if "valid" in batch:
    return jnp.asarray(batch["valid"]).astype(jnp.float32).reshape(batch_size)
  return jnp.ones((batch_size,), jnp.float32)


def _semantic_labels(batch: Mapping[str, jax.Array], num_classes: int) -> jax.Array:
  if "semantic" in batch:
    return batch["semantic"].astype(jnp.int32)
  slot_ids = batch["slot_ids"].astype(jnp.int32)
  classes = jnp.take_along_axis(batch["slot_classes"].astype(jnp.int32)[:, None, :],
                                jnp.clip(slot_ids, 0, None).reshape(slot_ids.shape[0], 1, -1), axis=2)
  classes = classes.reshape(slot_ids.shape)
  return jnp.where((slot_ids >= 0) & (classes < num_classes), classes, -1)


def kmax_losses(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array], weights: LossConfig,
                rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """All kMaX-DeepLab losses, summed over the final output and its auxiliary outputs.

  Args:
    outputs: model outputs (see the module docstring); "aux_outputs" optional.
    batch: ground truth with "slot_ids" [B, H, W] and "slot_classes" [B, M] (optional "semantic").
    weights: a LossConfig.
    rng: PRNG key for the instance-discrimination pixel sampling.

  Returns:
    (total, terms): the weighted scalar total and a dict of weighted scalars "pq_class", "pq_dice", "mask_id",
    "instance", "semantic" (each summed over all outputs), plus "total".
  """
  targets = match_final_output(outputs, batch, weights)
  all_outputs = [outputs] + list(outputs.get("aux_outputs", ()))
  terms = {"pq_class": 0.0, "pq_dice": 0.0, "mask_id": 0.0, "instance": 0.0, "semantic": 0.0}
  rngs = jax.random.split(rng, len(all_outputs))
  final_hw = outputs["mask_logits"].shape[1:3]
  for out, key in zip(all_outputs, rngs):
    if out["mask_logits"].shape[1:3] != final_hw:
      raise ValueError(f"auxiliary mask logits {out['mask_logits'].shape} differ in size from the final "
                       f"output {outputs['mask_logits'].shape}; resize them in the model first")
    if weights.pq_weight:
      terms["pq_class"] += weights.pq_weight * pq_class_loss(out["class_logits"], targets, weights.focal_alpha)
      terms["pq_dice"] += weights.pq_weight * pq_dice_loss(out["mask_logits"], targets, weights.focal_alpha)
    if weights.mask_id_weight:
      terms["mask_id"] += weights.mask_id_weight * mask_id_loss(out["mask_logits"], targets)
    if weights.instance_weight and "pixel_feature" in out:
      terms["instance"] += weights.instance_weight * instance_discrimination_loss(
          out["pixel_feature"], targets, key, weights.instance_sample_k, weights.instance_temperature,
          weights.instance_similarity_temperature, grid_hw=final_hw)
  if weights.semantic_weight and outputs.get("semantic_logits") is not None:
    num_classes = outputs["class_logits"].shape[-1] - 1
    terms["semantic"] = weights.semantic_weight * semantic_loss(
        outputs["semantic_logits"], _semantic_labels(batch, num_classes), weights.semantic_topk,
        targets.image_weight)
  terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
  total = sum(terms.values())
  terms["total"] = total
  return total, terms
