"""The one place that decides which kernels a platform runs.

Every choice is made when a computation is lowered for a platform (`lax.platform_dependent`), not when a model is
built: the model's modules call these functions and never ask where they run, the same model object can be compiled
for CPU and GPU in one process, and a function exported for several platforms carries each platform's kernels (the
StableHLO holds both alternatives; the compiler sees only its own). On XLA:CPU the formulations of `cpu_conv` and
`xla_cpu` apply; GPU and TPU get plain lax. Inside `portable()` every choice is the plain-lax one at trace time, for
converters (ONNX) that read the traced program rather than compile it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Sequence, TypeVar

import jax
from jax import lax

from panoptic_jax.ops import cpu_conv, xla_cpu

T = TypeVar("T")

_PORTABLE = contextvars.ContextVar("panoptic_jax_portable_kernels", default=False)


@contextlib.contextmanager
def portable() -> Iterator[None]:
  """While active, `by_platform` traces `default` alone: no `platform_index`/`cond`, no CPU kernels or barriers.

  For converters of the traced program to other runtimes (ONNX): the program they get is the one GPUs and TPUs run.
  It acts at trace time, so it changes only functions traced inside it: a `jax.jit` function already traced outside
  keeps its cached program (and one traced inside keeps the portable one); trace a fresh function here.
  """
  token = _PORTABLE.set(True)
  try:
    yield
  finally:
    _PORTABLE.reset(token)


def by_platform(*args: Any, cpu: Callable[..., T], default: Callable[..., T]) -> T:
  """`cpu(*args)` when lowered for XLA:CPU, `default(*args)` for any other platform (same output shapes); always
  `default(*args)` inside `portable()`."""
  if _PORTABLE.get():
    return default(*args)
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                         **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` (the `conv_general_dilated=` of `nnx.Conv`), by `cpu_conv` on XLA:CPU."""
  options = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                 rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                 feature_group_count=feature_group_count, precision=precision, **kwargs)
  return by_platform(lhs, rhs, cpu=functools.partial(cpu_conv.conv_general_dilated, **options),
                     default=functools.partial(lax.conv_general_dilated, **options))


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None, out_sharding: Any = None) -> jax.Array:
  """`lax.dot_general` (the `dot_general=` of `nnx.Linear`); on XLA:CPU a `[..., in] x [in, out]` product takes
  `xla_cpu.matmul_last_axis`'s kernel gradient."""
  lax_call = functools.partial(lax.dot_general, dimension_numbers=dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)
  plain = (precision is None and preferred_element_type is None and out_sharding is None and rhs.ndim == 2
           and tuple(dimension_numbers) == (((lhs.ndim - 1,), (0,)), ((), ())))
  if not plain:
    return lax_call(lhs, rhs)
  return by_platform(lhs, rhs, cpu=xla_cpu.matmul_last_axis, default=lax_call)


def _identity(x: jax.Array) -> jax.Array:
  return x


def fusion_barrier(x: jax.Array) -> jax.Array:
  """Identity; on XLA:CPU, YNNPACK's fusions of the forward pass do not grow across it (`xla_cpu.fusion_barrier`)."""
  return by_platform(x, cpu=xla_cpu.fusion_barrier, default=_identity)


def backward_fusion_barrier(x: jax.Array) -> jax.Array:
  """Identity; on XLA:CPU, YNNPACK's fusions of the backward pass do not grow across it."""
  return by_platform(x, cpu=xla_cpu.backward_fusion_barrier, default=_identity)


def train_step_compiler_options(platform: str) -> dict[str, str] | None:
  """XLA options for compiling a train step for devices of `platform` ("cpu", "gpu", "tpu")."""
  return dict(xla_cpu.TRAIN_STEP_COMPILER_OPTIONS) if platform == "cpu" else None
