"""XLA:CPU-specific pieces that are not convolutions: fusion barriers, a matmul with a layout-friendly kernel
gradient, and the train step's compiler options. `ops/dispatch.py` decides where they apply; nothing here checks the
platform.

XLA:CPU hands each matmul to YNNPACK together with the elementwise ops around it. YNNPACK runs some of those slower
than XLA's own loops (GELU's erf, reductions) or cannot fuse them at all (slices: a shifted sum pulled into such a
fusion had each of its windows written out as a full-size copy). A `reduce_precision` to the value's own format
changes no bit, survives XLA's simplifier and is not a YNNPACK op, so it bounds those fusions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _same_format(x: jax.Array) -> jax.Array:
  info = jnp.finfo(x.dtype)
  return jax.lax.reduce_precision(x, info.nexp, info.nmant)


@jax.custom_vjp
def fusion_barrier(x: jax.Array) -> jax.Array:
  """Identity that YNNPACK's fusions cannot grow across, in the forward pass only (the backward is untouched: the
  train step did not get faster with a barrier there)."""
  return _same_format(x)


fusion_barrier.defvjp(lambda x: (_same_format(x), None), lambda _, g: (g,))


@jax.custom_vjp
def backward_fusion_barrier(x: jax.Array) -> jax.Array:
  """Identity whose gradient passes through `fusion_barrier`: the forward is untouched, the backward's YNNPACK
  fusions cannot grow across it."""
  return x


backward_fusion_barrier.defvjp(lambda x: (x, None), lambda _, g: (fusion_barrier(g),))


@jax.custom_vjp
def matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`x [..., Cin] @ kernel [Cin, Cout] -> [..., Cout]`, whose kernel gradient contracts the pixels where they lie.

  JAX's transpose rule of `dot_general` asks for the cotangent as `[Cout, P]`, which XLA:CPU materialises with a
  transpose about as slow as the matmul itself; here the kernel gradient is `x [P, Cin]^T @ grad [P, Cout]`.
  """
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_last_axis_fwd(x, kernel):
  return matmul_last_axis(x, kernel), (x, kernel)


def _matmul_last_axis_bwd(residuals, grad):
  x, kernel = residuals
  grad_x = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
  grad_kernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]),
                                    (((0,), (0,)), ((), ())))
  return grad_x, grad_kernel.astype(kernel.dtype)


matmul_last_axis.defvjp(_matmul_last_axis_fwd, _matmul_last_axis_bwd)


# XLA:CPU's default HLO schedule maximises how many independent ops can run at once; on a few cores concurrent ops
# only share them, and the memory-optimised order reuses buffers sooner (a faster and smaller train step). Inference
# keeps the default: its forward pass ran slower with this order.
TRAIN_STEP_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
