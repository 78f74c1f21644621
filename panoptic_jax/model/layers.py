"""Shared building blocks: conv/dense + BatchNorm + activation, drop-path, align-corners resize.

Everything is channels-last (`[B, H, W, C]` for images, `[B, N, C]` for cluster centres). Every parameter carries
logical axis names (see `sharding_rules.py`); kernels are created with `nnx.with_partitioning`.

Norm defaults follow kMaX-DeepLab: BatchNorm momentum 0.99, epsilon 1e-3. Under `jax.jit` over a batch sharded on
a mesh the batch statistics are global (synchronised BatchNorm) without extra work.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from panoptic_jax.model import sharding_rules as ax

BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

Dtype = Any


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in PyTorch's and TensorFlow's form, `x / 2 * (1 + erf(x / sqrt(2)))`.

  `jax.nn.gelu(approximate=False)` writes it with erfc, which XLA:CPU evaluates 23% slower (5% of the R50 train
  step); the two agree to 1e-6. The output is a `ynn_boundary`.
  """
  return ynn_boundary(0.5 * x * (1.0 + jax.lax.erf(x * (1 / math.sqrt(2)))))


@jax.custom_vjp
def ynn_boundary(x: jax.Array) -> jax.Array:
  """Identity that XLA:CPU's YNNPACK fusions cannot grow across (on other backends, plain identity).

  XLA:CPU hands each matmul to YNNPACK together with the elementwise ops around it, which YNNPACK runs slower than
  XLA's own loops (GELU's erf) or cannot run at all: slices are not fused, so when the shifted sum of a depthwise
  convolution was pulled in, each of its windows was first written out as a full-size copy. A `reduce_precision` to
  the value's own format changes no bit, survives XLA's simplifier and is not a YNNPACK op. Placed on GELU's output
  and the depthwise sum: the kMaX pixel head at 321x321 ran in 0.19 s instead of 0.33 s, R50 inference at 1281 went
  from 5.6-6.2 to 5.0 s. Only the forward carries it: the backward is unchanged (the train step did not get faster
  with it there).
  """
  if jax.default_backend() != "cpu":
    return x
  info = jnp.finfo(x.dtype)
  return jax.lax.reduce_precision(x, info.nexp, info.nmant)


ynn_boundary.defvjp(lambda x: (ynn_boundary(x), None), lambda _, g: (g,))


@jax.custom_vjp
def ynn_grad_boundary(x: jax.Array) -> jax.Array:
  """Identity whose gradient passes through `ynn_boundary`: the forward is untouched, the backward's YNNPACK fusions
  cannot grow across it.

  Placed around the pixel decoder's input LayerNorms: their backward (two channel reductions per pixel) had been
  fused by YNNPACK with the matmuls that produce and consume their cotangents (the semantic head's and the
  backbone's input gradients), 287 ms of op time per R50 train step; as XLA loops, 197 ms. Around every BatchNorm
  the same step got slower (17.6 against 16.4 s of op time), so it stays where it was measured to help.
  """
  return x


ynn_grad_boundary.defvjp(lambda x: (x, None), lambda _, g: (ynn_boundary(g),))


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
    no concatenated copy is written (the axial attention's similarity and output BatchNorms: their op time in a
    profiled R50 inference at 641 fell from 227 to 185 ms). Training needs the batch statistics of the concatenation.
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


def layer_norm(num_features: int, *, epsilon: float = 1e-6, dtype: Dtype = None, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      num_features, epsilon=epsilon, dtype=dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (ax.NORM,)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (ax.NORM,)),
      rngs=rngs)


@jax.custom_vjp
def _matmul_last_axis(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., Cin] @ kernel [Cin, Cout] -> [..., Cout]."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_last_axis_fwd(x, kernel):
  return _matmul_last_axis(x, kernel), (x, kernel)


def _matmul_last_axis_bwd(residuals, grad):
  x, kernel = residuals
  grad_x = jax.lax.dot_general(grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())))
  # The kernel gradient contracts the pixels of x [P, Cin] and of the cotangent [P, Cout] where they lie. JAX's
  # transpose rule of dot_general asks for the cotangent as [Cout, P], which XLA:CPU materialises with a transpose as
  # slow as the matmul (~1.6 s of ResNet-50's 641 train step went to them).
  grad_kernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]),
                                    (((0,), (0,)), ((), ())))
  return grad_x, grad_kernel.astype(kernel.dtype)


_matmul_last_axis.defvjp(_matmul_last_axis_fwd, _matmul_last_axis_bwd)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`lax.dot_general` for `nnx.Linear`: its `[..., in] x [in, out]` case gets a layout-friendly kernel gradient."""
  plain = (precision is None and preferred_element_type is None and out_sharding is None and rhs.ndim == 2
           and dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())))
  if plain:
    return _matmul_last_axis(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, out_sharding=out_sharding)


def dense(in_features: int, out_features: int, *, use_bias: bool = False, kernel_init: nnx.Initializer | None = None,
          out_axis: str = ax.CONV_OUT, in_axis: str = ax.CONV_IN, dtype: Dtype = None,
          rngs: nnx.Rngs) -> nnx.Linear:
  """A 1x1 convolution on the last axis (`[..., in] -> [..., out]`), i.e. a matmul."""
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, dot_general=dense_dot_general,
      kernel_init=nnx.with_partitioning(kernel_init or he_normal(), (in_axis, out_axis)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (out_axis,)),
      rngs=rngs)


def _windows(padded: jax.Array, kernel_hw: tuple[int, int], dilation: tuple[int, int],
             strides: tuple[int, int] = (1, 1)):
  """The kernel taps of a window over an already padded `[B, H, W, C]`: yields `(i, j, window)` with
  `window = padded[:, i*dh : i*dh + sh*(H' - 1) + 1 : sh, j*dw : ...]`, `H' = (H - dh * (kh - 1) - 1) // sh + 1`
  (and W' alike): the input values that tap (i, j) of the kernel meets, one per output pixel."""
  (kh, kw), (dh, dw), (sh, sw) = kernel_hw, dilation, strides
  out_h, out_w = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1, (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
  for i in range(kh):
    for j in range(kw):
      yield i, j, padded[:, i * dh:i * dh + sh * (out_h - 1) + 1:sh, j * dw:j * dw + sw * (out_w - 1) + 1:sw]


def _padded(x: jax.Array, padding: tuple) -> jax.Array:
  """`x [B, H, W, C]` padded by `((top, bottom), (left, right))` (negative values crop), in float32."""
  x = jax.lax.pad(x.astype(jnp.float32), jnp.float32(0), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
  # Padded once: otherwise XLA fuses the pad into each of the 25 slices and writes every window out.
  return jax.lax.optimization_barrier(x)


def _block_rows(out_h: int, row_elements: int, block_elements: int) -> int:
  """The largest divisor of `out_h` whose rows hold at most `block_elements` values (at least 1)."""
  return max(r for r in range(1, out_h + 1) if out_h % r == 0 and (r == 1 or r * row_elements <= block_elements))


def _shifted_sum(x: jax.Array, kernel: jax.Array, padding: tuple, dilation: tuple[int, int],
                 block_elements: int | None = None) -> jax.Array:
  """`sum_ij pad(x)[:, i*dh + h, j*dw + w] * kernel[i, j]` for `x [B, H, W, C]`, `kernel [kh, kw, C]`, in float32.

  `padding` is `((top, bottom), (left, right))`, negative values crop. Products and sums are float32 (a
  convolution's accumulator) also for bfloat16 inputs. XLA fuses the casts, slices and products into one loop, and
  the `ynn_boundary` keeps YNNPACK out of it. That loop is cheap to inline, so XLA:CPU copies it into every consumer
  it fuses with; with `block_elements`, the sum runs over blocks of output rows (about that many values each) in a
  `fori_loop` whose result is written out once.
  """
  kernel = kernel.astype(jnp.float32)
  (kh, kw), (dh, dw) = kernel.shape[:2], dilation
  padded = _padded(x, padding)

  def shifted_sum(rows_in):
    return sum(window * kernel[i, j] for i, j, window in _windows(rows_in, (kh, kw), dilation))

  if block_elements is None:
    return ynn_boundary(shifted_sum(padded))
  batch, height, width, channels = padded.shape
  out_h, out_w = height - dh * (kh - 1), width - dw * (kw - 1)
  rows = _block_rows(out_h, batch * out_w * channels, block_elements)

  def block(k, out):
    part = shifted_sum(jax.lax.dynamic_slice_in_dim(padded, k * rows, rows + dh * (kh - 1), axis=1))
    return jax.lax.dynamic_update_slice_in_dim(out, part, k * rows, axis=1)

  return jax.lax.fori_loop(0, out_h // rows, block, jnp.zeros((batch, out_h, out_w, channels), jnp.float32))


# Training's forward sums the depthwise taps in blocks of about 2M values (see `_shifted_sum`): under autodiff the
# sum feeds the batch-norm statistics, GELU's erf and its derivative and the normalised output, and XLA:CPU had
# summed the 25 taps in each of them. A 5x5 depthwise + BN + GELU + 1x1 at [2, 161, 161, 256], forward and
# backward: 390-410 -> 350-365 ms. Inference keeps the single fused loop (one consumer; 78 against 98 ms blocked).
_TRAIN_BLOCK_ELEMENTS = 1 << 21


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x: jax.Array, kernel: jax.Array, padding: tuple, dilation: tuple[int, int]) -> jax.Array:
  return _shifted_sum(x, kernel, padding, dilation).astype(jnp.result_type(x, kernel))


def _depthwise_fwd(x, kernel, padding, dilation):
  out = _shifted_sum(x, kernel, padding, dilation, _TRAIN_BLOCK_ELEMENTS)
  return out.astype(jnp.result_type(x, kernel)), (x, kernel)


def _depthwise_bwd(padding, dilation, residuals, grad):
  """Both gradients as shifts: the input's is the same sum over the flipped kernel (transposed padding), the
  kernel's one per-channel reduction per tap. Written out because XLA's derivative of the shifted sum adds the 25
  padded terms in a transposed layout (about 5x slower than the forward on CPU)."""
  x, kernel = residuals
  # A barrier keeps XLA's CSE from merging the kernel gradient's slices of x with the forward's: when both sliced the
  # same 25 windows, every window was written out (a full-size copy each) instead of being summed in one fused loop.
  x = jax.lax.optimization_barrier(x)
  kh, kw = kernel.shape[:2]
  dh, dw = dilation
  span_h, span_w = dh * (kh - 1), dw * (kw - 1)
  grad_padding = ((span_h - padding[0][0], span_h - padding[0][1]), (span_w - padding[1][0], span_w - padding[1][1]))
  dx = _shifted_sum(grad, kernel[::-1, ::-1], grad_padding, dilation)
  dk = _kernel_grad(x, grad, padding, (kh, kw), dilation).reshape(kernel.shape)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


def _kernel_grad(x: jax.Array, grad: jax.Array, padding: tuple, kernel_hw: tuple[int, int],
                 dilation: tuple[int, int], block_elements: int = 1 << 16) -> jax.Array:
  """`dk[i * kw + j, c] = sum_bhw pad(x)[b, h + i*dh, w + j*dw, c] * grad[b, h, w, c]` -> `[kh * kw, C]` float32.

  Summed over blocks of output rows (about `block_elements` values of `grad` each) in a loop: each of the kh * kw
  products re-reads its window and `grad`, and a block keeps both in cache. Over whole images, XLA:CPU also wrote
  every window out as a full-size copy (YNNPACK's reductions do not fuse slices).
  """
  (kh, kw), dh = kernel_hw, dilation[0]
  batch, out_h, out_w, channels = grad.shape
  rows = max(1, min(out_h, block_elements // (batch * out_w * channels)))
  num_blocks = -(-out_h // rows)
  extra = num_blocks * rows - out_h  # Zero rows of grad (and x padding to match) complete the last block.
  g = jnp.pad(grad.astype(jnp.float32), ((0, 0), (0, extra), (0, 0), (0, 0)))
  x = jax.lax.pad(x.astype(jnp.float32), jnp.float32(0),
                  ((0, 0, 0), (padding[0][0], padding[0][1] + extra, 0), (*padding[1], 0), (0, 0, 0)))

  def block(k, total):
    xb = jax.lax.dynamic_slice_in_dim(x, k * rows, rows + dh * (kh - 1), axis=1)
    gb = jax.lax.dynamic_slice_in_dim(g, k * rows, rows, axis=1)
    return total + jnp.stack([jnp.sum(window * gb, axis=(0, 1, 2))
                              for _, _, window in _windows(xb, kernel_hw, dilation)])

  return jax.lax.fori_loop(0, num_blocks, block, jnp.zeros((kh * kw, channels), jnp.float32))


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def depthwise_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                                   lhs_dilation: Sequence[int] | None = None,
                                   rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                                   feature_group_count: int = 1, precision: Any = None, **kwargs) -> jax.Array:
  """A stride-1 depthwise convolution as a sum of shifted, per-channel-scaled inputs (same math as the lax call).

  Drop-in for `lax.conv_general_dilated` in `nnx.Conv` (`conv_general_dilated=`), for `lhs [B, H, W, C]` and
  `rhs [kh, kw, 1, C]` with `feature_group_count == C`. Why: XLA:CPU lowers the kernel gradient of a grouped
  convolution (a `batch_group_count` convolution) to a dense `[C, kh, kw, C]` convolution and keeps its diagonal,
  C times the work (a 5x5 depthwise conv on 256 channels at stride 4 took ~20 s of a train step), and runs the
  forward grouped convolution ~5x slower than this sum. GPU and TPU compilers lower grouped-convolution gradients
  natively (cuDNN, the TPU convolution unit), so `conv` only uses this on CPU.

  Args:
    lhs: `[B, H, W, C]` input.
    rhs: `[kh, kw, 1, C]` depthwise kernel.
    window_strides: must be all 1.
    padding: explicit `((top, bottom), (left, right))` padding.
    lhs_dilation: must be None or all 1.
    rhs_dilation: kernel dilation (atrous rate) per spatial axis.
    dimension_numbers, precision, kwargs: accepted for signature compatibility; the layout is NHWC / HWIO.
    feature_group_count: must equal C.

  Returns:
    `[B, H', W', C]` with `H' = H + top + bottom - dilation * (kh - 1)`, in the inputs' dtype.
  """
  del dimension_numbers, precision, kwargs
  kh, kw, one, channels = rhs.shape
  if (one != 1 or feature_group_count != channels or lhs.shape[-1] != channels or tuple(window_strides) != (1, 1)
      or (lhs_dilation is not None and tuple(lhs_dilation) != (1, 1)) or isinstance(padding, str)):
    raise ValueError(f"depthwise_conv_general_dilated: expected a stride-1 depthwise NHWC convolution with explicit "
                     f"padding, found input {lhs.shape}, kernel {rhs.shape}, groups {feature_group_count}, strides "
                     f"{window_strides}, padding {padding}, lhs_dilation {lhs_dilation}")
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
  return _depthwise(lhs, rhs[:, :, 0], padding, dilation)


_NHWC = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)


# Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
# the 2x2 output tile of a 4x4 input tile d is A^T [(G g G^T) * (B^T d B)] A for the 3x3 kernel g.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])


def _combine(coefficients: np.ndarray, terms: Sequence[jax.Array]) -> jax.Array:
  """`sum_i coefficients[i] * terms[i]` over the non-zero coefficients, +-1 as plain adds and subtracts."""
  total = None
  for c, term in zip(coefficients, terms):
    if c == 0:
      continue
    if total is None:
      total = term if c == 1 else term * float(c)
    elif c in (1, -1):
      total = total + term if c == 1 else total - term
    else:
      total = total + term * float(c)
  return total


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, padding: tuple, *, transposed: bool = False) -> jax.Array:
  """A stride-1, undilated 3x3 dense convolution by Winograd's F(2x2, 3x3): 16 multiplications per 2x2 output tile
  and channel pair instead of 36, as 16 matmuls `[B * tiles, Cin] x [Cin, Cout]`.

  Same sums as `lax.conv_general_dilated`, in another order: against a float64 reference its float32 error is that
  of lax's (the input and output transforms only add, subtract and halve). Why: XLA:CPU runs ResNet-50's 3x3
  convolutions at 100-175 GFLOP/s; this form takes about half of their time in isolation (`bench/conv.py`), and the
  input gradient of such a convolution is another one (`_dense_conv_bwd`). Used on CPU for float32 and at least
  64 channels (see `dense_conv_general_dilated`).

  Args:
    x: `[B, H, W, Cin]`.
    kernel: `[3, 3, Cin, Cout]`, or with `transposed` `[3, 3, Cout, Cin]`, used flipped and with its channel axes
      swapped (the input gradient of a convolution with that kernel) without writing that copy out.
    padding: `((top, bottom), (left, right))`, each in 0..2.
    transposed: see `kernel`.

  Returns:
    `[B, H + top + bottom - 2, W + left + right - 2, Cout]`.
  """
  (top, bottom), (left, right) = padding
  batch, height, width, in_ch = x.shape
  out_h, out_w = height + top + bottom - 2, width + left + right - 2
  tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
  # Padded so that the last tile is whole (4 rows from 2 * (tiles - 1)); the extra outputs are cropped below.
  padded = jnp.pad(x, ((0, 0), (top, 2 * tiles_h + 2 - top - height), (left, 2 * tiles_w + 2 - left - width), (0, 0)))
  taps = [window for _, _, window in _windows(padded, (4, 4), (1, 1), (2, 2))]  # [B, tiles_h, tiles_w, Cin] each
  if transposed:
    weights = [kernel[2 - a, 2 - b] for a in range(3) for b in range(3)]
    contract = (((1,), (1,)), ((), ()))
  else:
    weights = [kernel[a, b] for a in range(3) for b in range(3)]
    contract = (((1,), (0,)), ((), ()))
  products = []
  for i in range(4):
    for j in range(4):
      # Each transformed tile straight from the taps, and 16 matmuls rather than one batched over a stack of the
      # tiles: XLA:CPU wrote that stack out in an extra copy, and the batched form took 1.2-1.3x as long.
      tile = _combine(np.outer(_WINOGRAD_BT[i], _WINOGRAD_BT[j]).ravel(), taps)
      weight = _combine(np.outer(_WINOGRAD_G[i], _WINOGRAD_G[j]).ravel(), weights)
      product = jax.lax.dot_general(tile.reshape(-1, in_ch), weight, contract)
      products.append(product.reshape(batch, tiles_h, tiles_w, -1))
  rows = [jnp.stack([_combine(np.outer(_WINOGRAD_AT[p], _WINOGRAD_AT[q]).ravel(), products) for q in range(2)], axis=3)
          for p in range(2)]
  # rows[p]: [B, tiles_h, tiles_w, 2, Cout], the outputs in rows 2t + p; interleaved as [B, tiles_h, 2, tiles_w, 2, C].
  out = jnp.stack(rows, axis=2).reshape(batch, 2 * tiles_h, 2 * tiles_w, -1)
  return out[:, :out_h, :out_w]


# Below this many input or output channels the 16 small matmuls and the transforms cost more than lax's convolution
# (8-16 channels: 1.2-1.6x lax's time, forward and backward; 32-48: either way; 64 and up: faster at every shape
# tried), and they lengthen compilation (a tiny model's train step: +15%).
_WINOGRAD_MIN_CHANNELS = 64


def _winograd_applies(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> bool:
  return (kernel.shape[:2] == (3, 3) and strides == (1, 1) and x.dtype == kernel.dtype == jnp.float32
          and min(kernel.shape[2:]) >= _WINOGRAD_MIN_CHANNELS and all(0 <= p <= 2 for pair in padding for p in pair))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> jax.Array:
  if _winograd_applies(x, kernel, strides, padding):
    return winograd_conv3x3(x, kernel, padding)
  return _lax_conv(x, kernel, strides, padding)


def _dense_conv_fwd(x, kernel, strides, padding):
  return _dense_conv(x, kernel, strides, padding), (x, kernel)


def _dense_conv_bwd(strides, padding, residuals, grad):
  """The input gradient (a Winograd convolution with the flipped kernel where the forward is one, else lax's); the
  kernel gradient as one matmul `patches [P, kh*kw*Cin]^T @ grad [P, Cout]` that contracts the pixels where they lie
  (the im2col patches of x: each tap's strided window, side by side)."""
  x, kernel = residuals
  if _winograd_applies(x, kernel, strides, padding):
    grad_x = winograd_conv3x3(grad, kernel, tuple((2 - lo, 2 - hi) for lo, hi in padding), transposed=True)
  else:
    grad_x = jax.vjp(lambda v: _lax_conv(v, kernel, strides, padding), x)[1](grad)[0]
  kh, kw, in_ch, out_ch = kernel.shape
  padded = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)))
  patches = jnp.concatenate([w for _, _, w in _windows(padded, (kh, kw), (1, 1), strides)], axis=-1)
  grad_kernel = jax.lax.dot_general(patches.reshape(-1, kh * kw * in_ch), grad.reshape(-1, out_ch),
                                    (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


def dense_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                               lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                               dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                               **kwargs) -> jax.Array:
  """A dense undilated convolution (same math as lax's): Winograd's for stride-1 3x3 float32 ones with 64 or more
  channels (`winograd_conv3x3`, forward and input gradient), lax's otherwise; the kernel gradient as one im2col
  matmul.

  Drop-in for `lax.conv_general_dilated` in `nnx.Conv`, for `lhs [B, H, W, Cin]`, `rhs [kh, kw, Cin, Cout]`, any
  strides and padding, no dilation. Why the kernel gradient: XLA:CPU computes it as a convolution of the input with
  the output gradient, after transposing both to `[C, H, W, B]`, at 10-25 GFLOP/s. One matmul over the im2col
  patches runs at the matmul rate: fwd + bwd of ResNet-50's 7x7 stem at 641 (3 input channels) 636 -> 194 ms, its
  3x3 convs 1.1-2.6x faster at every stage (`bench/conv.py`). The patches are a transient `kh * kw` times the
  input. Only used on CPU (see `conv`).

  Args:
    lhs: `[B, H, W, Cin]` input.
    rhs: `[kh, kw, Cin, Cout]` kernel.
    window_strides: strides per spatial axis.
    padding: explicit `((top, bottom), (left, right))` padding, or "SAME" / "VALID".
    lhs_dilation, rhs_dilation: must be None or all 1.
    dimension_numbers, precision, kwargs: accepted for signature compatibility; the layout is NHWC / HWIO.
    feature_group_count: must be 1.

  Returns:
    `[B, H', W', Cout]`, as `lax.conv_general_dilated`.
  """
  del dimension_numbers, precision, kwargs
  if (rhs.shape[2] != lhs.shape[-1] or feature_group_count != 1
      or any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation))):
    raise ValueError(f"dense_conv_general_dilated: expected a dense undilated NHWC convolution, found input "
                     f"{lhs.shape}, kernel {rhs.shape}, groups {feature_group_count}, lhs_dilation {lhs_dilation}, "
                     f"rhs_dilation {rhs_dilation}")
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  return _dense_conv(lhs, rhs, strides, tuple((int(lo), int(hi)) for lo, hi in padding))


def _tap_range(size: int, out_size: int, offset: int) -> tuple[int, int]:
  """Output positions `[lo, hi)` whose input position `p + offset` lies inside `[0, size)` (may be empty)."""
  return max(0, -offset), min(out_size, size - offset)


def atrous_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                                lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                                dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                                **kwargs) -> jax.Array:
  """A stride-1 dilated (atrous) dense convolution as one matmul per kernel tap, over only the output pixels where
  that tap reads the image rather than its zero padding (same math as the lax call).

  Drop-in for `lax.conv_general_dilated` in `nnx.Conv`, for `lhs [B, H, W, Cin]`, `rhs [kh, kw, Cin, Cout]`. Why:
  ASPP's 3x3 convolutions at rates 6/12/18 on a stride-32 feature map (21x21 for a 641 crop) read mostly padding:
  at rate 18 the eight outer taps touch 3 rows or columns each, 18% of the nominal work is real. XLA:CPU runs
  them as full dilated convolutions at 40-70 GFLOP/s; the per-tap matmuls skip the zeros, and their gradients are
  matmuls too. The three ASPP convolutions at 21x21 (2048 -> 256 channels, batch 2), forward and backward: 0.69-0.74 s
  -> 0.27-0.29 s. Only used on CPU (see `conv`).

  Args:
    lhs: `[B, H, W, Cin]` input.
    rhs: `[kh, kw, Cin, Cout]` kernel.
    window_strides: must be all 1.
    padding: explicit `((top, bottom), (left, right))` padding (non-negative).
    lhs_dilation: must be None or all 1.
    rhs_dilation: kernel dilation (atrous rate) per spatial axis.
    dimension_numbers, precision, kwargs: accepted for signature compatibility; the layout is NHWC / HWIO.
    feature_group_count: must be 1.

  Returns:
    `[B, H', W', Cout]` with `H' = H + top + bottom - dilation * (kh - 1)`.
  """
  del dimension_numbers, precision, kwargs
  batch, height, width, in_ch = lhs.shape
  kh, kw, kernel_in, out_ch = rhs.shape
  if (kernel_in != in_ch or feature_group_count != 1 or tuple(window_strides) != (1, 1)
      or (lhs_dilation is not None and tuple(lhs_dilation) != (1, 1)) or isinstance(padding, str)
      or min(p for pair in padding for p in pair) < 0):
    raise ValueError(f"atrous_conv_general_dilated: expected a stride-1 dense NHWC convolution with explicit "
                     f"non-negative padding, found input {lhs.shape}, kernel {rhs.shape}, groups "
                     f"{feature_group_count}, strides {window_strides}, padding {padding}, lhs_dilation {lhs_dilation}")
  (top, bottom), (left, right) = padding
  dh, dw = (int(d) for d in (rhs_dilation or (1, 1)))
  out_h, out_w = height + top + bottom - dh * (kh - 1), width + left + right - dw * (kw - 1)
  out = jnp.zeros((batch, out_h, out_w, out_ch), jnp.result_type(lhs, rhs))
  for i in range(kh):
    h0, h1 = _tap_range(height, out_h, i * dh - top)
    for j in range(kw):
      w0, w1 = _tap_range(width, out_w, j * dw - left)
      if h0 >= h1 or w0 >= w1:
        continue  # This tap reads only padding.
      window = lhs[:, h0 + i * dh - top:h1 + i * dh - top, w0 + j * dw - left:w1 + j * dw - left]
      part = _matmul_last_axis(window, rhs[i, j])
      out = out + jnp.pad(part, ((0, 0), (h0, out_h - h1), (w0, out_w - w1), (0, 0)))
  return out


def conv(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1, padding: Any = None,
         dilation: int = 1, groups: int = 1, use_bias: bool = False, kernel_init: nnx.Initializer | None = None,
         dtype: Dtype = None, rngs: nnx.Rngs) -> nnx.Conv:
  """A k x k convolution, channels-last. Default padding is symmetric `dilation * (k - 1) / 2` (PyTorch style),
  which gives `(H - 1) // stride + 1` outputs for the odd `stride * n + 1` sizes that kMaX uses. On CPU, stride-1
  depthwise convolutions run as `depthwise_conv_general_dilated`, stride-1 dilated dense ones as
  `atrous_conv_general_dilated` and undilated dense ones as `dense_conv_general_dilated` (see there why);
  parameters are the same either way."""
  if padding is None:
    p = dilation * (kernel_size - 1) // 2
    padding = ((p, p), (p, p))
  conv_general_dilated = jax.lax.conv_general_dilated
  if jax.default_backend() == "cpu":
    if stride == 1 and groups == in_features == out_features > 1:
      conv_general_dilated = depthwise_conv_general_dilated
    elif stride == 1 and groups == 1 and dilation > 1:
      conv_general_dilated = atrous_conv_general_dilated
    elif groups == 1 and dilation == 1:
      conv_general_dilated = dense_conv_general_dilated
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides=stride, padding=padding,
      kernel_dilation=dilation, feature_group_count=groups, use_bias=use_bias, dtype=dtype,
      conv_general_dilated=conv_general_dilated,
      kernel_init=nnx.with_partitioning(kernel_init or he_normal(),
                                        (ax.CONV_H, ax.CONV_W, ax.CONV_IN, ax.CONV_OUT)),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (ax.CONV_OUT,)),
      rngs=rngs)


class ConvBN(nnx.Module):
  """conv (k x k, or a dense 1x1 when k == 1) -> BatchNorm -> activation, channels-last.

  A strided 1x1 convolution (ResNet's projection shortcuts) is the dense 1x1 on every `stride`-th pixel: the same
  outputs, and its kernel gradient is a plain matmul. As a strided convolution, XLA:CPU transposed the input to
  `[C, H, W, B]` for that gradient and ran it at 20-25 GFLOP/s: 0.9 s of the R50 train step for three layers.
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


@functools.lru_cache(maxsize=None)
def _interp_taps(in_size: int, out_size: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Bilinear taps per output position (PyTorch semantics for both align_corners settings): `(lo, hi, frac)`, each
  `[out]`; output `o` is `(1 - frac[o]) * x[lo[o]] + frac[o] * x[hi[o]]`."""
  dst = np.arange(out_size, dtype=np.float64)
  if in_size == 1:
    src = np.zeros_like(dst)
  elif align_corners:
    src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(dst)
  else:
    src = np.maximum((dst + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo.astype(np.int32), hi.astype(np.int32), (src - lo).astype(np.float32)


def _interp_matrix(in_size: int, out_size: int, align_corners: bool) -> np.ndarray:
  """[out, in] bilinear interpolation weights (`_interp_taps` as a matrix)."""
  lo, hi, frac = _interp_taps(in_size, out_size, align_corners)
  m = np.zeros((out_size, in_size), np.float32)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def _lerp(low: jax.Array, high: jax.Array, frac: jax.Array) -> jax.Array:
  """`low (1 - frac) + high frac`: the one bilinear step every resize and sample here is made of."""
  return low * (1 - frac) + high * frac


def _upsample_align_corners(x: jax.Array, axis: int, out_size: int) -> jax.Array:
  """Align-corners bilinear upsampling along `axis` by the integer factor r = (out - 1) / (in - 1): output
  `r * k + t` is `x[k] + (t / r) (x[k + 1] - x[k])`. Elementwise (2 multiply-adds per output) where the
  interpolation-matrix product costs 2 * in per output (81 -> 161 at stride 4: 40x the work)."""
  n = x.shape[axis]
  r = (out_size - 1) // (n - 1)
  lo = jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)
  hi = jax.lax.slice_in_dim(x, 1, n, axis=axis)
  frac = jnp.arange(r, dtype=jnp.float32) / r
  frac = frac.reshape((r,) + (1,) * (x.ndim - axis - 1)).astype(x.dtype)
  steps = _lerp(jnp.expand_dims(lo, axis + 1), jnp.expand_dims(hi, axis + 1), frac)  # [.., n-1, r, ..]
  steps = steps.reshape(x.shape[:axis] + ((n - 1) * r,) + x.shape[axis + 1:])
  return jnp.concatenate([steps, jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis=axis)


def _resize_axis(x: jax.Array, axis: int, out_size: int, align_corners: bool) -> jax.Array:
  """Bilinear resize of one spatial axis (1 or 2) of `[B, H, W, C]`."""
  n = x.shape[axis]
  if n == out_size:
    return x
  if align_corners and n > 1 and (out_size - 1) % (n - 1) == 0:
    return _upsample_align_corners(x, axis, out_size)
  m = jnp.asarray(_interp_matrix(n, out_size, align_corners), x.dtype)
  return jnp.einsum("oh,bhwc->bowc", m, x) if axis == 1 else jnp.einsum("pw,bowc->bopc", m, x)


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool | None = None) -> jax.Array:
  """Bilinear resize of `[B, H, W, C]` to `[B, h, w, C]`, one axis at a time (no gathers; exports cleanly).

  Integer-factor align-corners upsampling (every kMaX resize: stride 32/16/8 -> 4 on `stride * k + 1` crops) is
  two slices and a multiply-add per axis; other sizes use a product with the `[out, in]` interpolation matrix.
  `align_corners=None` picks kMaX's rule: align corners when the *input* size is odd (the `stride * k + 1`
  crops), which makes stride-s features land exactly on the full-resolution grid.
  """
  h, w = int(size[0]), int(size[1])
  if align_corners is None:
    align_corners = (x.shape[2] % 2 == 1)
  return _resize_axis(_resize_axis(x, 1, h, align_corners), 2, w, align_corners)


def sample_bilinear(x: jax.Array, rows: jax.Array, cols: jax.Array, size: Sequence[int],
                    align_corners: bool | None = None) -> jax.Array:
  """`resize_bilinear(x, size, align_corners)[b, rows[b, k], cols[b, k]]` -> `[B, K, C]`, without the resized map.

  For `x [B, H, W, C]` and integer `rows`, `cols [B, K]` on the `size` grid: four gathers of `x` and the same
  interpolation weights as `resize_bilinear` (rows first, then columns). The kMaX losses read 4096 pixels of each
  auxiliary pixel embedding: this skips resizing 21x21 (or 41, 81) maps to 161x161 and the gradient of that resize.
  """
  batch, height, width, channels = x.shape
  if (height, width) == tuple(size):
    return jnp.take_along_axis(x.reshape(batch, height * width, channels), (rows * width + cols)[..., None], axis=1)
  if align_corners is None:
    align_corners = (width % 2 == 1)
  (r0, r1, fr), (c0, c1, fc) = ([jnp.asarray(t)[index] for t in _interp_taps(n, int(out), align_corners)]
                                for n, out, index in ((height, size[0], rows), (width, size[1], cols)))
  fr, fc = fr[..., None].astype(x.dtype), fc[..., None].astype(x.dtype)
  flat = x.reshape(batch, height * width, channels)
  pixel = lambda r, c: jnp.take_along_axis(flat, (r * width + c)[..., None], axis=1)
  return _lerp(_lerp(pixel(r0, c0), pixel(r1, c0), fr), _lerp(pixel(r0, c1), pixel(r1, c1), fr), fc)


def maybe_remat(module: nnx.Module, enabled: bool, *args):
  """Calls `module(*args)`, rematerialised (activations recomputed in the backward pass) when `enabled`."""
  if not enabled:
    return module(*args)
  return nnx.remat(lambda m, *a: m(*a))(module, *args)
