"""Building blocks: BatchNorm of parts, the exact GELU, LayerNorm, conv defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from panoptic_jax.model import layers as L


@pytest.mark.parametrize("axis", [2, -1])
def test_batch_norm_sum_of_parts_equals_concatenated_norm(axis):
  """The axial attention's BatchNorm of parts side by side, summed part by part: the same values in training (batch
  statistics, running averages updated) and in eval (each part its slice of the affine map, no concatenation)."""
  keys = jax.random.split(jax.random.key(0), 3)
  parts = [jax.random.normal(k, (2, 5, 4, 6, 6)) * (i + 1) + i for i, k in enumerate(keys)]
  channels = 3 * parts[0].shape[axis]

  def reference(bn):
    normed = bn(jnp.concatenate(parts, axis=axis))
    return sum(jnp.split(normed, 3, axis=axis))

  with nnx.use_eager_sharding(False):
    bn, ref_bn = (L.batch_norm(channels, axis=axis, rngs=nnx.Rngs(0)) for _ in range(2))
  for b in (bn, ref_bn):
    b.scale.set_value(jnp.linspace(0.5, 2.0, channels))
    b.bias.set_value(jnp.linspace(-1.0, 1.0, channels))
  np.testing.assert_allclose(np.asarray(bn.sum_of_parts(parts)), np.asarray(reference(ref_bn)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var.get_value()), np.asarray(ref_bn.var.get_value()), rtol=1e-6)
  assert not np.allclose(np.asarray(bn.var.get_value()), 1.0)  # The training call updated the statistics.
  bn.use_running_average = ref_bn.use_running_average = True
  got = jax.jit(lambda: bn.sum_of_parts(parts))()
  np.testing.assert_allclose(np.asarray(got), np.asarray(reference(ref_bn)), rtol=1e-5, atol=1e-5)
  hlo = jax.jit(lambda: bn.sum_of_parts(parts)).lower().compile().as_text()
  assert "concatenate(" not in hlo


def test_gelu_is_the_exact_gelu():
  x = jnp.linspace(-4, 4, 17)
  np.testing.assert_allclose(np.asarray(L.gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False)), atol=1e-6)


def test_layer_norm_equals_flax_layer_norm_with_gradients():
  """The LayerNorm whose backward XLA:CPU keeps apart computes what nnx.LayerNorm computes, value and gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8))
  with nnx.use_eager_sharding(False):
    ours = L.layer_norm(8, rngs=nnx.Rngs(0))
  plain = nnx.LayerNorm(8, epsilon=1e-6, rngs=nnx.Rngs(0))
  for module in (ours, plain):
    module.scale.set_value(jnp.linspace(0.5, 2.0, 8))
  loss = lambda m, x: jnp.sum(jnp.sin(m(x)))  # noqa: E731
  (v1, g1), (v2, g2) = (nnx.value_and_grad(loss, argnums=(0, 1))(m, x) for m in (ours, plain))
  np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g1[1]), np.asarray(g2[1]), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(g1[0]["scale"][...]), np.asarray(g2[0]["scale"][...]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,dilation,size", [(3, 1, 1, 9), (3, 2, 1, 9), (5, 1, 1, 9), (3, 1, 6, 21),
                                                         (7, 2, 1, 65)])
def test_conv_default_padding_keeps_the_stride_grid(kernel, stride, dilation, size):
  """Symmetric `dilation * (k - 1) / 2` padding: `(H - 1) // stride + 1` outputs on `stride * n + 1` inputs."""
  with nnx.use_eager_sharding(False):
    conv = L.conv(4, 4, kernel, stride=stride, dilation=dilation, rngs=nnx.Rngs(0))
  out = conv(jnp.ones((1, size, size, 4)))
  assert out.shape == (1, (size - 1) // stride + 1, (size - 1) // stride + 1, 4)
