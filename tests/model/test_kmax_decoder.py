"""The k-means cross-attention: a hard, stopped assignment; the block's predictor trains only through the losses."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from panoptic_jax.model.kmax_decoder import KMaXBlock, kmeans_assignment


def test_kmeans_assignment_is_hard_and_stops_gradient():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
  a = kmeans_assignment(logits)
  np.testing.assert_array_equal(np.asarray(a.sum(-1)), 1.0)
  np.testing.assert_array_equal(np.asarray(a.argmax(-1)), np.asarray(logits.argmax(-1)))
  g = jax.grad(lambda l: jnp.sum(kmeans_assignment(l) * jnp.arange(4.0)))(logits)
  np.testing.assert_array_equal(np.asarray(g), 0.0)

def test_kmax_block_predictor_gets_no_gradient_through_assignment():
  """The block's output centres depend on its auxiliary predictor only through the (stopped) assignment."""
  with nnx.use_eager_sharding(False):   # no mesh here: keep the logical names as metadata only
    block = KMaXBlock(8, 5, query_ch=16, bottleneck=16, key_depth=8, value_depth=16, num_heads=2, ffn=32,
                      embed=8, hidden=16, rngs=nnx.Rngs(0))
  pixel = jax.random.normal(jax.random.key(1), (2, 5, 5, 8))
  centres = jax.random.normal(jax.random.key(2), (2, 6, 16))

  def loss(block):
    new, _ = block(pixel, centres)
    return jnp.sum(new ** 2)

  grads = nnx.jit(nnx.grad(loss))(block)
  pred_grads = jax.tree.leaves(grads["predictor"])
  assert pred_grads and all(float(jnp.abs(g).max()) == 0.0 for g in pred_grads)
  # The k-means update itself is trained (its last BN gamma is zero at init, so only that gets a gradient now).
  assert float(jnp.abs(grads["kmeans_conv3"]["norm"]["scale"][...]).max()) > 0.0
