"""Parameters sharded by their logical axis names: FSDP over 8 devices computes what one device computes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from panoptic_jax.model.kmax_deeplab import build_model
from panoptic_jax.model.sharding_rules import DEFAULT_AXIS_RULES, param_shardings

NUM_CLASSES = 7
SIZE = 65


def _images(batch, size=SIZE, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (batch, size, size, 3)).astype(np.uint8))


@pytest.mark.slow
def test_sharded_8_devices_matches_single_device():
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  model = build_model("kmax_tiny", NUM_CLASSES, rngs=nnx.Rngs(0))
  model.eval()
  images = _images(8, seed=3)
  graphdef, state = nnx.split(model)

  def fwd(state, x):
    return nnx.merge(graphdef, state)(x)

  single = jax.jit(fwd)(state, images)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  shardings = param_shardings(state, mesh, DEFAULT_AXIS_RULES)
  assert any(s.spec != P() for s in jax.tree.leaves(shardings))           # FSDP actually shards something
  sharded_state = jax.device_put(state, shardings)
  x = jax.device_put(images, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    multi = jax.jit(fwd)(sharded_state, x)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
