"""kMaX losses: hand-computed values, a numpy/scipy reference, gradients, perfect predictions, slot permutations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from panoptic_jax import ops
from panoptic_jax.training import losses as L

CFG = L.LossConfig()
_loss_fn = jax.jit(lambda o, b, r, cfg=CFG: L.kmax_losses(o, b, cfg, r), static_argnames="cfg")


def _run(outputs, batch, cfg=CFG, seed=0):
  _, terms = _loss_fn(outputs, batch, jax.random.key(seed), cfg=cfg)
  return {k: float(v) for k, v in terms.items()}


def test_hand_computed_tiny_case():
  # 2x2 pixels: ground-truth slot 0 (class 0) on the top row, slot 1 (class 1) bottom-left, bottom-right void.
  # Zero logits: mask probs 0.5 per slot, class probs 1/3 (2 classes + void).
  batch = {"slot_ids": jnp.array([[[0, 0], [1, -1]]]), "slot_classes": jnp.array([[0, 1]])}
  outputs = {
      "mask_logits": jnp.zeros((1, 2, 2, 2)),
      "class_logits": jnp.zeros((1, 2, 3)),
      "pixel_feature": jnp.eye(4).reshape(1, 2, 2, 4),  # Orthogonal unit features: cosine similarity = identity.
      "semantic_logits": jnp.zeros((1, 2, 2, 3)),
  }
  terms = _run(outputs, batch)
  # Matched dice: gt0 = 1 / ((2 + 1.5) / 2), gt1 = 0.5 / ((1 + 1.5) / 2) (void pixel removed from predictions).
  dice0, dice1 = 1 / 1.75, 0.5 / 1.25
  pq_class = 3.0 * math.log(3) * 0.75 * (dice0 + dice1) / 2
  # Dice term: slot of gt0: 1 - (2 * 1 + 1) / (1.5 + 2 + 1); slot of gt1: 1 - (2 * 0.5 + 1) / (1.5 + 1 + 1),
  # each weighted by the class probability 1/3, summed and scaled by 0.75 / 2 slots.
  pq_dice = 3.0 * (0.75 / 2) * (1 / 3) * ((1 - 3 / 4.5) + (1 - 2 / 3.5))
  mask_id = 0.3 * math.log(2)
  lse = math.log(math.exp(1 / 0.3) + 3)
  instance = 1.0 * (2 * (lse - 0.5 / 0.3) + (lse - 1 / 0.3)) / 3
  semantic = 1.0 * math.log(3)
  expected = {"pq_class": pq_class, "pq_dice": pq_dice, "mask_id": mask_id, "instance": instance,
              "semantic": semantic}
  for k, v in expected.items():
    assert terms[k] == pytest.approx(v, rel=1e-5), k
  assert terms["total"] == pytest.approx(sum(expected.values()), rel=1e-5)


def _reference_pq_mask_id(mask_logits, class_logits, slot_ids, slot_classes, alpha=0.75):
  """Loop-based numpy/scipy version of the PQ-style class and dice terms and the mask-ID CE (weights 1)."""
  b_size, h, w, n = mask_logits.shape
  num_classes = class_logits.shape[-1] - 1
  cls_terms, dice_terms, mid_terms = [], [], []
  for b in range(b_size):
    logits = mask_logits[b].reshape(-1, n).astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ids = slot_ids[b].reshape(-1)
    gts = [m for m in range(len(slot_classes[b])) if slot_classes[b][m] >= 0 and (ids == m).sum() > 0]
    non_void = np.isin(ids, gts).astype(np.float64)
    cl = class_logits[b].astype(np.float64)
    cprobs = np.exp(cl - cl.max(-1, keepdims=True))
    cprobs /= cprobs.sum(-1, keepdims=True)
    cost = np.zeros((len(gts), n))
    dice = np.zeros((len(gts), n))
    for i, m in enumerate(gts):
      g = (ids == m).astype(np.float64)
      for j in range(n):
        pj = probs[:, j] * non_void
        dice[i, j] = (g * pj).sum() / ((g.sum() + pj.sum()) / 2 + 1e-5)
        cost[i, j] = -dice[i, j] * cprobs[j, slot_classes[b][m]]
    rows, cols = scipy_lsa(cost)
    slot_gt = {int(cols[k]): (gts[int(rows[k])], int(rows[k])) for k in range(len(rows))}
    # Class term.
    cls = []
    for j in range(n):
      if j in slot_gt:
        m, i = slot_gt[j]
        target, weight = slot_classes[b][m], alpha * max(dice[i, j], 1e-5)
      else:
        void_ratio = (probs[:, j] * (1 - non_void)).sum() / (probs[:, j].sum() + 1e-5)
        target, weight = num_classes, (1 - alpha) * max(void_ratio, 1e-5)
      cls.append(-np.log(cprobs[j, target]) * weight)
    cls = np.array(cls)
    cls_terms.append(cls.sum() / max(1, (cls != 0).sum()))
    # Dice term.
    d = 0.0
    for j, (m, i) in slot_gt.items():
      g = (ids == m).astype(np.float64)
      pj = probs[:, j] * non_void
      d += (1 - (2 * (g * pj).sum() + 1) / (pj.sum() + g.sum() + 1)) * max(cprobs[j, slot_classes[b][m]], 1e-5)
    dice_terms.append(d * alpha / n)
    # Mask-ID cross-entropy.
    slot_of_gt = {m: j for j, (m, _) in slot_gt.items()}
    ce = [-np.log(probs[p, slot_of_gt[ids[p]]]) for p in range(len(ids)) if ids[p] in slot_of_gt]
    mid_terms.append(np.sum(ce) / max(1, len(ce)))
  return np.mean(cls_terms), np.mean(dice_terms), np.mean(mid_terms)


@pytest.mark.parametrize("num_gt,num_slots", [(6, 6), (4, 7), (9, 5)])
def test_against_numpy_reference(num_gt, num_slots):
  rng = np.random.default_rng(num_gt * 10 + num_slots)
  b, h, w, c = 2, 9, 9, 4
  slot_ids = rng.integers(-1, num_gt, (b, 17, 17))  # Ground truth at 2x resolution (stride 2, aligned corners).
  slot_classes = rng.integers(0, c, (b, num_gt))
  slot_classes[0, -2:] = -1  # Empty slots.
  outputs = {"mask_logits": rng.normal(size=(b, h, w, num_slots)).astype(np.float32) * 2,
             "class_logits": rng.normal(size=(b, num_slots, c + 1)).astype(np.float32) * 2}
  batch = {"slot_ids": slot_ids, "slot_classes": slot_classes}
  cfg = L.LossConfig(pq_weight=1.0, mask_id_weight=1.0, instance_weight=0.0, semantic_weight=0.0)
  terms = _run(outputs, batch, cfg)
  ref_cls, ref_dice, ref_mid = _reference_pq_mask_id(outputs["mask_logits"], outputs["class_logits"],
                                                     slot_ids[:, ::2, ::2], slot_classes)
  assert terms["pq_class"] == pytest.approx(ref_cls, rel=1e-4)
  assert terms["pq_dice"] == pytest.approx(ref_dice, rel=1e-4)
  assert terms["mask_id"] == pytest.approx(ref_mid, rel=1e-4)


def _random_problem(seed, b=2, h=8, w=8, n=6, m=6, c=4, d=8, aux=2):
  rng = np.random.default_rng(seed)
  slot_ids = rng.integers(-1, m - 1, (b, h, w))
  slot_classes = rng.integers(0, c, (b, m))
  slot_classes[:, -1] = -1

  def one():
    return {"mask_logits": jnp.asarray(rng.normal(size=(b, h, w, n)), jnp.float32),
            "class_logits": jnp.asarray(rng.normal(size=(b, n, c + 1)), jnp.float32),
            "pixel_feature": jnp.asarray(rng.normal(size=(b, h, w, d)), jnp.float32)}

  outputs = one()
  outputs["semantic_logits"] = jnp.asarray(rng.normal(size=(b, h, w, c + 1)), jnp.float32)
  outputs["aux_outputs"] = [one() for _ in range(aux)]
  return outputs, {"slot_ids": jnp.asarray(slot_ids), "slot_classes": jnp.asarray(slot_classes)}


def test_gradients_finite_and_nonzero():
  outputs, batch = _random_problem(0)
  grads = jax.jit(jax.grad(lambda o: L.kmax_losses(o, batch, CFG, jax.random.key(1))[0]))(outputs)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 0, path


@pytest.mark.slow
@pytest.mark.parametrize("sample_k", [16, 4096])
def test_coarse_auxiliary_pixel_features_equal_resized_ones(sample_k):
  """Auxiliary pixel features at a coarser stride (upsampled at the sampled pixels only) give the loss and the
  gradient of features resized to the mask grid first; with sample_k >= pixels, every pixel is taken."""
  outputs, batch = _random_problem(3, h=9, w=9)
  coarse = [jnp.asarray(np.random.default_rng(i).normal(size=(2, 3, 3, 8)), jnp.float32) for i in range(2)]
  cfg = L.LossConfig(instance_sample_k=sample_k)
  loss = lambda features, resize: L.kmax_losses(
      dict(outputs, aux_outputs=[dict(a, pixel_feature=resize(f)) for a, f in zip(outputs["aux_outputs"], features)]),
      batch, cfg, jax.random.key(4))[1]["instance"]
  want = jax.value_and_grad(loss)(coarse, lambda f: ops.resize_bilinear(f, (9, 9)))
  got = jax.value_and_grad(loss)(coarse, lambda f: f)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  for g, e in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-5)


def test_slot_permutation_invariance():
  outputs, batch = _random_problem(1)
  perm = np.random.default_rng(5).permutation(outputs["mask_logits"].shape[-1])

  def permute(o):
    o = dict(o)
    o["mask_logits"] = o["mask_logits"][..., perm]
    o["class_logits"] = o["class_logits"][:, perm]
    return o

  permuted = permute(outputs)
  permuted["aux_outputs"] = [permute(a) for a in outputs["aux_outputs"]]
  a, b = _run(outputs, batch, seed=3), _run(permuted, batch, seed=3)
  for k in a:
    assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_perfect_prediction_is_near_minimum():
  rng = np.random.default_rng(2)
  b, h, w, n, c = 2, 8, 8, 6, 3
  slot_ids = rng.integers(-1, 4, (b, h, w))
  slot_classes = np.array([[0, 1, 2, 1, -1, -1], [2, 2, 0, 1, -1, -1]])
  batch = {"slot_ids": jnp.asarray(slot_ids), "slot_classes": jnp.asarray(slot_classes)}
  # Perfect prediction: ground-truth slot m is predicted by slot perm[m], its class with high confidence;
  # the remaining slots predict void and no pixels. Features: one orthogonal direction per mask.
  perm = np.array([3, 0, 5, 1, 2, 4])
  mask_logits = np.full((b, h, w, n), -30.0, np.float32)
  class_logits = np.full((b, n, c + 1), -30.0, np.float32)
  class_logits[:, :, c] = 30.0
  feature = np.zeros((b, h, w, 8), np.float32)
  semantic_logits = np.full((b, h, w, c + 1), -30.0, np.float32)
  for i in range(b):
    for m in range(4):
      mask_logits[i][slot_ids[i] == m, perm[m]] = 30.0
      class_logits[i, perm[m]] = -30.0
      class_logits[i, perm[m], slot_classes[i, m]] = 30.0
      feature[i][slot_ids[i] == m, m] = 1.0
      semantic_logits[i][slot_ids[i] == m, slot_classes[i, m]] = 30.0
    feature[i][slot_ids[i] == -1, 7] = 1.0
  outputs = {"mask_logits": mask_logits, "class_logits": class_logits, "pixel_feature": feature,
             "semantic_logits": semantic_logits}
  perfect = _run(outputs, batch)
  for k in ("pq_class", "pq_dice", "mask_id", "semantic"):
    assert perfect[k] < 1e-4, (k, perfect[k])
  # Instance discrimination cannot reach 0 (bounded cosine / 0.3); perfect features beat random ones.
  for seed in range(5):
    noisy = dict(outputs, pixel_feature=np.random.default_rng(seed).normal(size=feature.shape).astype(np.float32))
    assert perfect["instance"] < _run(noisy, batch)["instance"]


def test_semantic_topk_and_explicit_labels():
  logits = np.zeros((1, 2, 2, 3), np.float32)
  logits[0, 0, 0] = [5.0, 0.0, 0.0]  # Label 0: easy pixel.
  labels = np.array([[[0, 1], [2, -1]]])
  full = float(L.semantic_loss(jnp.asarray(logits), jnp.asarray(labels)))
  ce = [math.log(1 + 2 * math.exp(-5)), math.log(3), math.log(3)]
  assert full == pytest.approx(sum(ce) / 3, rel=1e-5)
  half = float(L.semantic_loss(jnp.asarray(logits), jnp.asarray(labels), topk=0.5))
  assert half == pytest.approx(math.log(3), rel=1e-5)  # The 2 hardest of 4 pixels.


def test_all_void_image_gives_finite_loss_and_gradients():
  outputs, batch = _random_problem(4, aux=1)
  batch = {"slot_ids": jnp.full_like(batch["slot_ids"], -1), "slot_classes": jnp.full_like(batch["slot_classes"], -1)}
  loss_fn = lambda o: L.kmax_losses(o, batch, CFG, jax.random.key(0))  # noqa: E731
  (total, terms), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(outputs)
  assert np.isfinite(float(total))
  assert float(terms["pq_dice"]) == 0.0 and float(terms["mask_id"]) == 0.0 and float(terms["instance"]) == 0.0
  assert float(terms["pq_class"]) > 0.0  # Every slot is pushed toward void.
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_padding_images_are_left_out():
  outputs, batch = _random_problem(6, aux=1)
  cfg = L.LossConfig(instance_weight=0.0)  # Pixel sampling depends on the batch size; the rest must agree.
  first = lambda x: x[:1]  # noqa: E731
  single_out = jax.tree.map(first, outputs)
  single = _run(single_out, jax.tree.map(first, batch), cfg)
  padded = _run(outputs, dict(batch, valid=jnp.array([True, False])), cfg)
  for k in single:
    assert padded[k] == pytest.approx(single[k], rel=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("unit_norm", [False, True])
def test_similarity_logsumexp_gradient_is_autodiffs(unit_norm):
  # The instance-discrimination normaliser (shifted by the largest similarity) and its written-out gradient equal
  # autodiff's plain logsumexp, for the loss's unit-norm features and for others.
  x = jax.random.normal(jax.random.key(0), (2, 7, 5))
  if unit_norm:
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  cotangent = jax.random.normal(jax.random.key(1), (2, 7))
  plain = lambda v: jax.nn.logsumexp(jnp.einsum("bkd,bjd->bkj", v, v) / 0.3, axis=-1)
  value, vjp = jax.vjp(lambda v: L.similarity_logsumexp(v, 0.3), x)
  np.testing.assert_allclose(value, plain(x), rtol=1e-6)
  np.testing.assert_allclose(vjp(cotangent)[0], jax.vjp(plain, x)[1](cotangent)[0], rtol=1e-5, atol=1e-5)
