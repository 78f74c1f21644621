"""Each platform gets its kernels when a computation is lowered for it, whatever machine builds the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from panoptic_jax import ops
from panoptic_jax.model import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def _exported(fn, platforms, *args) -> str:
  return jax.export.export(jax.jit(fn), platforms=platforms)(*args).mlir_module()


def test_cpu_gets_its_formulation_and_accelerators_get_lax():
  """A stride-1 3x3 64-channel convolution is Winograd's (16 matmuls, no convolution op) when lowered for CPU and a
  plain convolution for CUDA and TPU; a model-level layer built here follows the same rule."""
  x, w = jnp.ones((1, 9, 9, 64)), jnp.ones((3, 3, 64, 64))
  cpu = _exported(_conv, ("cpu",), x, w)
  assert "stablehlo.convolution" not in cpu and cpu.count("stablehlo.dot_general") == 16
  for platform in ("cuda", "tpu"):
    accelerator = _exported(_conv, (platform,), x, w)
    assert "stablehlo.convolution" in accelerator and "stablehlo.dot_general" not in accelerator
  with nnx.use_eager_sharding(False):
    conv = layers.conv(64, 64, 3, rngs=nnx.Rngs(0))
  graph, state = nnx.split(conv)
  cuda = _exported(lambda s, x: nnx.merge(graph, s)(x), ("cuda",), state, x)
  assert "stablehlo.convolution" in cuda


def test_one_export_carries_both_platforms_kernels():
  x, w = jnp.ones((1, 9, 9, 64)), jnp.ones((3, 3, 64, 64))
  both = _exported(_conv, ("cpu", "cuda"), x, w)
  assert "stablehlo.convolution" in both and "stablehlo.dot_general" in both


@pytest.mark.parametrize("barrier", [ops.fusion_barrier, ops.backward_fusion_barrier])
def test_fusion_barriers_are_cpu_only(barrier):
  x = jnp.ones((4, 8))
  assert "stablehlo.reduce_precision" in _exported(jax.grad(lambda v: jnp.sum(jnp.sin(barrier(v)))), ("cpu",), x)
  assert "stablehlo.reduce_precision" not in _exported(jax.grad(lambda v: jnp.sum(jnp.sin(barrier(v)))), ("cuda",), x)


def test_dot_general_matches_lax_on_every_form():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  w = jax.random.normal(jax.random.key(1), (16, 8))
  plain = (((2,), (0,)), ((), ()))
  np.testing.assert_allclose(np.asarray(ops.dot_general(x, w, plain)),
                             np.asarray(jax.lax.dot_general(x, w, plain)), rtol=1e-6)
  batched = (((2,), (2,)), ((0,), (0,)))
  y = jax.random.normal(jax.random.key(2), (2, 3, 16))
  np.testing.assert_allclose(np.asarray(ops.dot_general(x, y, batched)),
                             np.asarray(jax.lax.dot_general(x, y, batched)), rtol=1e-6)


def test_portable_traces_the_plain_lax_form_for_converters():
  """Inside `ops.portable()` the traced program has no platform choice: a converter reading the jaxpr (ONNX) sees
  the convolution GPUs run and no CPU barrier; outside it the choice is back."""
  x, w = jnp.ones((1, 9, 9, 64)), jnp.ones((3, 3, 64, 64))
  traced = lambda: str(jax.make_jaxpr(lambda x, w: ops.fusion_barrier(_conv(x, w)))(x, w))  # noqa: E731
  with ops.portable():
    portable = traced()
  assert "platform_index" not in portable and "cond" not in portable and "reduce_precision" not in portable
  assert portable.count("conv_general_dilated") == 1
  assert "platform_index" in traced()
