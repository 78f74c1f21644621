"""Shared building blocks: norms, conv / dense builders, conv + BatchNorm + activation, dropout and drop-path.

Everything is channels-last (`[B, H, W, C]` for images, `[B, N, C]` for cluster centres). Every parameter carries
logical axis names (see `sharding_rules.py`); kernels are created with `nnx.with_partitioning`.

Norm defaults follow kMaX-DeepLab: BatchNorm momentum 0.99, epsilon 1e-3. Under `jax.jit` over a batch sharded on
a mesh the batch statistics are global (synchronised BatchNorm) without extra work. Convolutions, matmuls and the
fusion barriers come from `panoptic_jax.ops`, which picks each platform's kernels.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from panoptic_jax import ops
from panoptic_jax.model import sharding_rules as ax

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

Dtype = Any


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's and TensorFlow's form, `x / 2 * (1 + erf(x / sqrt(2)))`.

  Written with erf: `jax.nn.gelu(approximate=False)` uses erfc, which XLA:CPU evaluates more slowly; the two agree to
  1e-6. On XLA:CPU its output bounds the matmul fusions around it (`ops.fusion_barrier`).
  """
  return ops.fusion_barrier(0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2)))))


def act_fn(name: str | None) -> Callable[[jax.Array], jax.Array]:
  if name is None or name == "none":
    return lambda x: x
  if name == "gelu":
    return gelu
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unknown activation {name!r}; expected one of gelu, relu, none")


def he_normal() -> nnx.Initializer:
  """Truncated-normal He init over fan-in (Keras `he_normal`)."""
  return nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


def trunc_normal(stddev: float) -> nnx.Initializer:
  """`stddev * N(0, 1)` truncated at +-2 (timm's `trunc_normal_tf_`, the DeepLab2 convention)."""

  def init(key, shape, dtype=jnp.float32):
    return (stddev * jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)).astype(dtype)

  return init


class BatchNorm(nnx.Module):
  """BatchNorm over every axis but `axis` (statistics in float32), kMaX defaults (momentum 0.99, eps 1e-3).

  Same variables and mode attribute as `nnx.BatchNorm` (`scale`, `bias` Params; `mean`, `var` BatchStats;
  `use_running_average`, set by `model.train()` / `model.eval()`). Own implementation because it updates its
  statistics with `set_value`: flax's `var[...] = x` compares shardings, which makes every update walk the whole
  trace (quadratic tracing time: minutes for a ResNet-50 train step).
  """

  def __init__(self, num_features: int, *, scale_init: float = 1.0, axis: int = -1, momentum: float = BN_MOMENTUM,
               epsilon: float = BN_EPSILON, dtype: Dtype = None, rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.full((num_features,), scale_init, jnp.float32), out_sharding=(ax.NORM,))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32), out_sharding=(ax.NORM,))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.use_running_average = False

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.use_running_average:
      mean, var = self.mean.get_value(), self.var.get_value()
    else:
      red = tuple(i for i in range(x.ndim) if i != self.axis % x.ndim)
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axis=red)
      var = jnp.maximum(jnp.mean(jnp.square(x32), axis=red) - jnp.square(mean), 0.0)
      m = self.momentum
      self.mean.set_value(jax.lax.stop_gradient(m * self.mean.get_value() + (1 - m) * mean))
      self.var.set_value(jax.lax.stop_gradient(m * self.var.get_value() + (1 - m) * var))
    mul, add = self._affine(mean, var)
    return self._apply(x, mul, add)

  def _affine(self, mean: jax.Array, var: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The normalisation as `x * mul + add`, `[C]` each."""
    mul = self.scale.get_value() * jax.lax.rsqrt(var + self.epsilon)
    return mul, self.bias.get_value() - mean * mul

  def _apply(self, x: jax.Array, mul: jax.Array, add: jax.Array) -> jax.Array:
    """`x * mul + add` with `[C]` vectors along the feature axis, in the compute dtype."""
    shape = [1] * x.ndim
    shape[self.axis % x.ndim] = mul.shape[0]
    dtype = self.dtype or x.dtype
    return x.astype(dtype) * mul.reshape(shape).astype(dtype) + add.reshape(shape).astype(dtype)

  def sum_of_parts(self, parts: Sequence[jax.Array]) -> jax.Array:
    """`sum_i normed[i]` with `normed = split(self(concatenate(parts, axis)), len(parts), axis)`: equal-shaped parts
    normalised side by side along the feature axis (each part its own channels), then added up.

    In eval mode the normalisation is a fixed affine map per channel, so each part takes its slice of it directly and
    no concatenated copy is written (the axial attention's similarity and output BatchNorms). Training needs the batch
    statistics of the concatenation.
    """
    if not self.use_running_average:
      return sum(jnp.split(self(jnp.concatenate(parts, axis=self.axis)), len(parts), axis=self.axis))
    mul, add = self._affine(self.mean.get_value(), self.var.get_value())
    return sum(self._apply(part, m, a)
               for part, m, a in zip(parts, jnp.split(mul, len(parts)), jnp.split(add, len(parts))))


def batch_norm(num_features: int, *, scale_init: float = 1.0, axis: int = -1, dtype: Dtype = None,
               rngs: nnx.Rngs) -> BatchNorm:
  """BatchNorm with kMaX's momentum/epsilon; scale and bias are named `("norm",)`."""
  return BatchNorm(num_features, scale_init=scale_init, axis=axis, dtype=dtype, rngs=rngs)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` (same variables) whose backward pass XLA:CPU computes apart from the matmuls around it.

  XLA:CPU fused a LayerNorm's backward (two channel reductions per pixel) with the matmuls that produce and consume
  its cotangents into YNNPACK fusions, which ran it slower than XLA's own loops (`ops.backward_fusion_barrier`).
  """

  def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
    return ops.backward_fusion_barrier(super().__call__(ops.backward_fusion_barrier(x), *args, **kwargs))


def layer_norm(num_features: int, *, epsilon: float = 1e-6, dtype: Dtype = None, rngs: nnx.Rngs) -> LayerNorm:
  return LayerNorm(
      num_features, epsilon=epsilon, dtype=dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (ax.NORM,)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (ax.NORM,)),
      rngs=rngs)


def dense(in_features: int, out_features: int, *, use_bias: bool = False, kernel_init: nnx.Initializer | None = None,
          out_axis: str = ax.CONV_OUT, in_axis: str = ax.CONV_IN, dtype: Dtype = None,
          rngs: nnx.Rngs) -> nnx.Linear:
  """A 1x1 convolution on the last axis (`[..., in] -> [..., out]`), i.e. a matmul."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, dot_general=ops.dot_general,
      kernel_init=nnx.with_partitioning(kernel_init or he_normal(), (in_axis, out_axis)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (out_axis,)),
      rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, padding: Any = None,
         dilation: int = 1, groups: int = 1, use_bias: bool = False, kernel_init: nnx.Initializer | None = None,
         dtype: Dtype = None, rngs: nnx.Rngs) -> nnx.Conv:
  """A k x k convolution, channels-last. Default padding is symmetric `dilation * (k - 1) / 2` (PyTorch style),
  which gives `(H - 1) // stride + 1` outputs for the odd `stride * n + 1` sizes that kMaX uses."""
  if padding is None:
    p = dilation * (kernel_size - 1) // 2
    padding = ((p, p), (p, p))
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=stride, padding=padding,
      kernel_dilation=dilation, feature_group_count=groups, use_bias=use_bias, dtype=dtype,
      conv_general_dilated=ops.conv_general_dilated,
      kernel_init=nnx.with_partitioning(kernel_init or he_normal(),
                                        (ax.CONV_H, ax.CONV_W, ax.CONV_IN, ax.CONV_OUT)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (ax.CONV_OUT,)),
      rngs=rngs)


class ConvBN(nnx.Module):
  """conv (k x k, or a dense 1x1 when k == 1) -> BatchNorm -> activation, channels-last.

  A strided 1x1 convolution (ResNet's projection shortcuts) is the dense 1x1 on every `stride`-th pixel: the same
  outputs, and its kernel gradient is a plain matmul (as a strided convolution, XLA:CPU transposed the input to
  `[C, H, W, B]` for that gradient and ran it slowly).
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 1, *, stride: int = 1,
               dilation: int = 1, groups: int = 1, use_bias: bool = False, norm: bool = True,
               act: str | None = None, bn_scale_init: float = 1.0, kernel_init: nnx.Initializer | None = None,
               dtype: Dtype = None, rngs: nnx.Rngs):
    self.subsample = stride if kernel_size == 1 and groups == 1 else 1
    if kernel_size == 1 and groups == 1:
      self.conv = dense(in_features, out_features, use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                        rngs=rngs)
    else:
      self.conv = conv(in_features, out_features, kernel_size, stride=stride, dilation=dilation, groups=groups,
                       use_bias=use_bias, kernel_init=kernel_init, dtype=dtype, rngs=rngs)
    self.norm = batch_norm(out_features, scale_init=bn_scale_init, dtype=dtype, rngs=rngs) if norm else None
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv(x[:, ::self.subsample, ::self.subsample])
    if self.norm is not None:
      x = self.norm(x)
    return act_fn(self.act)(x)


class _Stream(nnx.Module):
  """A key + counter (like `nnx.RngStream`) updated with `set_value` (see `BatchNorm` for why)."""

  def __init__(self, rngs: nnx.Rngs, tag: str = "dropout"):
    self.key = nnx.RngKey(rngs[tag]() if rngs is not None else jax.random.key(0), tag=tag)
    self.count = nnx.RngCount(jnp.zeros((), jnp.uint32), tag=tag)

  def __call__(self) -> jax.Array:
    c = self.count.get_value()
    self.count.set_value(c + 1)
    return jax.random.fold_in(self.key.get_value(), c)


class Dropout(nnx.Module):
  """Dropout (same role as `nnx.Dropout`, with a `set_value` key stream); `per_sample=True` drops whole samples.

  Per-sample dropout of a residual branch is stochastic depth (drop-path); `rate` = 1 - keep probability.
  """

  def __init__(self, rate: float, *, per_sample: bool = False, rngs: nnx.Rngs):
    self.rate = float(rate)
    self.per_sample = per_sample
    self.deterministic = False
    self.rng = _Stream(rngs) if self.rate > 0 else None

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1) if self.per_sample else x.shape
    mask = jax.random.bernoulli(self.rng(), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


def max_pool_3x3(x: jax.Array) -> jax.Array:
  """3x3 max-pooling with stride 2 and padding 1 of `[B, H, W, C]` (ResNet's stem): `(H - 1) // 2 + 1` rows."""
  # A Python scalar init value keeps reduce_window differentiable (an array init breaks reverse-mode AD).
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))


def maybe_remat(module: nnx.Module, enabled: bool, *args):
  """Calls `module(*args)`, rematerialised (activations recomputed in the backward pass) when `enabled`."""
  if not enabled:
    return module(*args)
  return nnx.remat(lambda m, *a: m(*a))(module, *args)
