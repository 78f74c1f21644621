"""The optimiser follows DeepLab2's recipe: schedule, decay only on kernels, backbone multiplier."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from panoptic_jax.training import optim


def test_schedule_warms_up_linearly_then_decays_poly_from_the_global_step():
  schedule = optim.learning_rate_schedule(base_lr=5e-4, warmup_steps=100, total_steps=1000, power=0.9)
  np.testing.assert_allclose(schedule(0), 0.0)
  np.testing.assert_allclose(schedule(50), 2.5e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(100), 5e-4 * (1 - 0.1) ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(schedule(550), 5e-4 * 0.45 ** 0.9, rtol=1e-6)
  np.testing.assert_allclose(schedule(1000), 0.0, atol=1e-12)
  np.testing.assert_allclose(schedule(1200), 0.0, atol=1e-12)


def _params():
  return {
      "backbone": {"conv": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,))}},
      "decoder": {"dense": {"kernel": jnp.ones((3, 3))}, "norm": {"scale": jnp.ones((3,))},
                  "cluster_centers": jnp.ones((4, 3))},
  }


def test_weight_decay_touches_only_kernels_and_backbone_update_is_scaled():
  lr, wd = 0.1, 0.5
  tx, _ = optim.make_optimizer(base_lr=lr, warmup_steps=0, total_steps=10**9, weight_decay=wd,
                               backbone_multiplier=0.1)
  params = _params()
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients the Adam step is 0: only decoupled weight decay (-lr * wd * w) moves the parameters.
  np.testing.assert_allclose(updates["decoder"]["dense"]["kernel"], -lr * wd, rtol=1e-5)
  np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -lr * wd * 0.1, rtol=1e-5)
  for untouched in (updates["backbone"]["conv"]["bias"], updates["decoder"]["norm"]["scale"],
                    updates["decoder"]["cluster_centers"]):
    np.testing.assert_array_equal(untouched, 0.0)


def test_adam_step_matches_optax_adamw_on_the_head():
  tx, _ = optim.make_optimizer(base_lr=1e-3, warmup_steps=0, total_steps=10**9, weight_decay=0.05,
                               backbone_multiplier=1.0, eps=1e-7)
  reference = optax.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.05,
                          mask=lambda p: jax.tree_util.tree_map_with_path(lambda k, _: optim.is_kernel(k), p))
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  ours, _ = tx.update(grads, tx.init(params), params)
  theirs, _ = reference.update(grads, reference.init(params), params)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path,expected", [(("backbone", "stem", "kernel"), True), (("head", "kernel"), False)])
def test_backbone_is_recognised_by_path(path, expected):
  keys = tuple(jax.tree_util.DictKey(k) for k in path)
  assert optim.is_backbone(keys) is expected


def test_masks_see_through_nnx_variables():
  from flax import nnx

  class Tiny(nnx.Module):

    def __init__(self):
      self.backbone = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
      self.norm = nnx.LayerNorm(2, rngs=nnx.Rngs(0))

  params = nnx.state(Tiny(), nnx.Param)
  kernels = jax.tree_util.tree_map_with_path(lambda p, _: optim.is_kernel(p), params)
  backbone = jax.tree_util.tree_map_with_path(lambda p, _: optim.is_backbone(p), params)
  assert kernels["backbone"]["kernel"].get_value() and not kernels["backbone"]["bias"].get_value()
  assert not kernels["norm"]["scale"].get_value()
  assert backbone["backbone"]["bias"].get_value() and not backbone["norm"]["bias"].get_value()
