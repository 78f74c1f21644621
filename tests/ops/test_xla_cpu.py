"""The fusion barriers and the matmul with its own kernel gradient: identities and exact gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panoptic_jax.ops import xla_cpu


def _bits(x):
  return np.asarray(x).view(np.uint16 if x.dtype == jnp.bfloat16 else np.uint32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fusion_barriers_change_no_bit_and_pass_gradients(dtype):
  """Both barriers (forward and backward) are identities in value, bit for bit, and in gradient."""
  x = jax.random.normal(jax.random.key(0), (4, 33), dtype) * 100
  want_grad = np.asarray(jnp.cos(x.astype(jnp.float32)).astype(dtype))
  for barrier in (xla_cpu.fusion_barrier, xla_cpu.backward_fusion_barrier):
    y = jax.jit(barrier)(x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(_bits(y), _bits(x))
    g = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(barrier(v).astype(jnp.float32)))))(x)
    np.testing.assert_array_equal(np.asarray(g), want_grad)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_last_axis_matches_lax_with_gradients_and_no_transposed_cotangent(dtype):
  """1x1 convolutions get their kernel gradient straight from the [P, C] layouts: lax's values, and no transpose of
  the cotangent (the copy XLA:CPU would materialise: [24, 126] from [2, 9, 7, 24])."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 16), dtype)
  w = jax.random.normal(jax.random.key(1), (16, 24), dtype)
  loss = lambda dot: lambda x, w: jnp.sum(jnp.sin(dot(x, w).astype(jnp.float32)))  # noqa: E731
  want = jax.value_and_grad(loss(lambda x, w: jax.lax.dot_general(x, w, (((3,), (0,)), ((), ())))), (0, 1))(x, w)
  got = jax.value_and_grad(loss(xla_cpu.matmul_last_axis), (0, 1))(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=tol)
  for g, e in zip(got[1], want[1]):
    assert g.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=tol, atol=tol)
  hlo = jax.jit(jax.grad(loss(xla_cpu.matmul_last_axis), 1)).lower(x, w).compile().as_text()
  assert not [line for line in hlo.splitlines() if "transpose(" in line and "[24,2,9,7]" in line]
