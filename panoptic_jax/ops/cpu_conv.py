"""Convolutions formulated for XLA:CPU: the same sums as `lax.conv_general_dilated`, in forms that XLA:CPU runs fast.

XLA:CPU lowers some convolutions, and more often their gradients, to slow generic loops; these formulations turn
them into matmuls and fused elementwise loops (`BENCHMARKS.md`, "CPU convolutions", has the measured speed-ups):
- depthwise, stride 1 (`depthwise_conv`): a sum of shifted, per-channel-scaled inputs. XLA:CPU lowers the kernel
  gradient of a grouped convolution to a dense `[C, kh, kw, C]` convolution and keeps its diagonal (C times the
  work), and runs the forward grouped convolution several times slower than this sum.
- dilated dense, stride 1 (`atrous_conv`): one matmul per kernel tap, over only the output pixels where that tap
  reads the image. ASPP's rate-6/12/18 convolutions on a stride-32 map read mostly padding.
- undilated dense (`dense_conv`): Winograd's F(2x2, 3x3) for stride-1 3x3 float32 convolutions of 64+ channels
  (forward and input gradient), lax's otherwise; the kernel gradient always as one matmul over the im2col patches,
  where XLA:CPU would transpose input and cotangent to `[C, H, W, B]` and convolve them slowly.

`conv_general_dilated` picks among them by shape, with `lax.conv_general_dilated`'s signature (the layout is NHWC /
HWIO). Which platform uses it is decided in `ops/dispatch.py`; GPU and TPU compilers lower all of these natively.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from panoptic_jax.ops import xla_cpu

NHWC = ("NHWC", "HWIO", "NHWC")

# Training's forward sums the depthwise taps over blocks of about this many values (see `_shifted_sum`): under
# autodiff the sum feeds the batch-norm statistics, GELU and its derivative and the normalised output, and XLA:CPU
# inlined the whole tap sum into each of them. Inference keeps one fused loop (a single consumer).
TRAIN_BLOCK_ELEMENTS = 1 << 21
# The depthwise kernel gradient's blocks of output rows (about this many values of the cotangent each).
KERNEL_GRAD_BLOCK_ELEMENTS = 1 << 16
# Below this many input or output channels Winograd's 16 small matmuls and its transforms cost more than lax's
# convolution and lengthen compilation.
WINOGRAD_MIN_CHANNELS = 64


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
  # Padded once: otherwise XLA fuses the pad into each of the kh * kw slices and writes every window out.
  return jax.lax.optimization_barrier(x)


def _block_rows(out_h: int, row_elements: int, block_elements: int) -> int:
  """The largest divisor of `out_h` whose rows hold at most `block_elements` values (at least 1)."""
  return max(r for r in range(1, out_h + 1) if out_h % r == 0 and (r == 1 or r * row_elements <= block_elements))


def _shifted_sum(x: jax.Array, kernel: jax.Array, padding: tuple, dilation: tuple[int, int],
                 block_elements: int | None = None) -> jax.Array:
  """`sum_ij pad(x)[:, i*dh + h, j*dw + w] * kernel[i, j]` for `x [B, H, W, C]`, `kernel [kh, kw, C]`, in float32.

  `padding` is `((top, bottom), (left, right))`, negative values crop. Products and sums are float32 (a
  convolution's accumulator) also for bfloat16 inputs. XLA fuses the casts, slices and products into one loop, and
  a fusion barrier keeps YNNPACK out of it. That loop is cheap to inline, so XLA:CPU copies it into every consumer
  it fuses with; with `block_elements`, the sum runs over blocks of output rows (about that many values each) in a
  `fori_loop` whose result is written out once.
  """
  kernel = kernel.astype(jnp.float32)
  (kh, kw), (dh, dw) = kernel.shape[:2], dilation
  padded = _padded(x, padding)

  def shifted_sum(rows_in):
    return sum(window * kernel[i, j] for i, j, window in _windows(rows_in, (kh, kw), dilation))

  if block_elements is None:
    return xla_cpu.fusion_barrier(shifted_sum(padded))
  batch, height, width, channels = padded.shape
  out_h, out_w = height - dh * (kh - 1), width - dw * (kw - 1)
  rows = _block_rows(out_h, batch * out_w * channels, block_elements)

  def block(k, out):
    part = shifted_sum(jax.lax.dynamic_slice_in_dim(padded, k * rows, rows + dh * (kh - 1), axis=1))
    return jax.lax.dynamic_update_slice_in_dim(out, part, k * rows, axis=1)

  return jax.lax.fori_loop(0, out_h // rows, block, jnp.zeros((batch, out_h, out_w, channels), jnp.float32))


def _depthwise_kernel_grad(x: jax.Array, grad: jax.Array, padding: tuple, kernel_hw: tuple[int, int],
                           dilation: tuple[int, int], block_elements: int) -> jax.Array:
  """`dk[i * kw + j, c] = sum_bhw pad(x)[b, h + i*dh, w + j*dw, c] * grad[b, h, w, c]` -> `[kh * kw, C]` float32.

  Summed over blocks of output rows (about `block_elements` values of `grad` each) in a loop: each of the kh * kw
  products re-reads its window and `grad`, and a block keeps both in cache. Over whole images XLA:CPU also wrote
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def depthwise_conv(x: jax.Array, kernel: jax.Array, padding: tuple, dilation: tuple[int, int],
                   train_block_elements: int = TRAIN_BLOCK_ELEMENTS,
                   grad_block_elements: int = KERNEL_GRAD_BLOCK_ELEMENTS) -> jax.Array:
  """A stride-1 depthwise convolution as a sum of shifted, per-channel-scaled inputs.

  Args:
    x: `[B, H, W, C]`.
    kernel: `[kh, kw, C]`.
    padding: `((top, bottom), (left, right))`.
    dilation: `(dh, dw)`.
    train_block_elements: values per block of rows in the forward pass of a differentiated call.
    grad_block_elements: values of the cotangent per block of rows in the kernel gradient.

  Returns:
    `[B, H', W', C]` with `H' = H + top + bottom - dh * (kh - 1)`, in the inputs' dtype.
  """
  del train_block_elements, grad_block_elements
  return _shifted_sum(x, kernel, padding, dilation).astype(jnp.result_type(x, kernel))


def _depthwise_fwd(x, kernel, padding, dilation, train_block_elements, grad_block_elements):
  del grad_block_elements
  out = _shifted_sum(x, kernel, padding, dilation, train_block_elements)
  return out.astype(jnp.result_type(x, kernel)), (x, kernel)


def _depthwise_bwd(padding, dilation, train_block_elements, grad_block_elements, residuals, grad):
  """Both gradients as shifts: the input's is the same sum over the flipped kernel (transposed padding), the
  kernel's one per-channel reduction per tap. Written out because XLA's derivative of the shifted sum adds the
  padded terms in a transposed layout (several times slower than the forward on CPU)."""
  del train_block_elements
  x, kernel = residuals
  # A barrier keeps XLA's CSE from merging the kernel gradient's slices of x with the forward's: when both sliced the
  # same windows, every window was written out (a full-size copy each) instead of being summed in one fused loop.
  x = jax.lax.optimization_barrier(x)
  kh, kw = kernel.shape[:2]
  dh, dw = dilation
  span_h, span_w = dh * (kh - 1), dw * (kw - 1)
  grad_padding = ((span_h - padding[0][0], span_h - padding[0][1]), (span_w - padding[1][0], span_w - padding[1][1]))
  dx = _shifted_sum(grad, kernel[::-1, ::-1], grad_padding, dilation)
  dk = _depthwise_kernel_grad(x, grad, padding, (kh, kw), dilation, grad_block_elements).reshape(kernel.shape)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def _tap_range(size: int, out_size: int, offset: int) -> tuple[int, int]:
  """Output positions `[lo, hi)` whose input position `p + offset` lies inside `[0, size)` (may be empty)."""
  return max(0, -offset), min(out_size, size - offset)


def atrous_conv(x: jax.Array, kernel: jax.Array, padding: tuple, dilation: tuple[int, int]) -> jax.Array:
  """A stride-1 dilated dense convolution as one matmul per kernel tap, over only the output pixels where that tap
  reads the image rather than its zero padding. Its gradients are matmuls too.

  Args:
    x: `[B, H, W, Cin]`.
    kernel: `[kh, kw, Cin, Cout]`.
    padding: `((top, bottom), (left, right))`, non-negative.
    dilation: `(dh, dw)`.

  Returns:
    `[B, H', W', Cout]` with `H' = H + top + bottom - dh * (kh - 1)`.
  """
  batch, height, width, _ = x.shape
  kh, kw, _, out_ch = kernel.shape
  (top, bottom), (left, right) = padding
  dh, dw = dilation
  out_h, out_w = height + top + bottom - dh * (kh - 1), width + left + right - dw * (kw - 1)
  out = jnp.zeros((batch, out_h, out_w, out_ch), jnp.result_type(x, kernel))
  for i in range(kh):
    h0, h1 = _tap_range(height, out_h, i * dh - top)
    for j in range(kw):
      w0, w1 = _tap_range(width, out_w, j * dw - left)
      if h0 >= h1 or w0 >= w1:
        continue  # This tap reads only padding.
      window = x[:, h0 + i * dh - top:h1 + i * dh - top, w0 + j * dw - left:w1 + j * dw - left]
      part = xla_cpu.matmul_last_axis(window, kernel[i, j])
      out = out + jnp.pad(part, ((0, 0), (h0, out_h - h1), (w0, out_w - w1), (0, 0)))
  return out


def _lax_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=NHWC)


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
  of lax's (the input and output transforms only add, subtract and halve).

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
      # tiles: XLA:CPU wrote that stack out in an extra copy, and the batched form was slower.
      tile = _combine(np.outer(_WINOGRAD_BT[i], _WINOGRAD_BT[j]).ravel(), taps)
      weight = _combine(np.outer(_WINOGRAD_G[i], _WINOGRAD_G[j]).ravel(), weights)
      product = jax.lax.dot_general(tile.reshape(-1, in_ch), weight, contract)
      products.append(product.reshape(batch, tiles_h, tiles_w, -1))
  rows = [jnp.stack([_combine(np.outer(_WINOGRAD_AT[p], _WINOGRAD_AT[q]).ravel(), products) for q in range(2)], axis=3)
          for p in range(2)]
  # rows[p]: [B, tiles_h, tiles_w, 2, Cout], the outputs in rows 2t + p; interleaved as [B, tiles_h, 2, tiles_w, 2, C].
  out = jnp.stack(rows, axis=2).reshape(batch, 2 * tiles_h, 2 * tiles_w, -1)
  return out[:, :out_h, :out_w]


def _winograd_applies(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> bool:
  return (kernel.shape[:2] == (3, 3) and strides == (1, 1) and x.dtype == kernel.dtype == jnp.float32
          and min(kernel.shape[2:]) >= WINOGRAD_MIN_CHANNELS and all(0 <= p <= 2 for pair in padding for p in pair))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: tuple) -> jax.Array:
  """A dense undilated convolution: Winograd's for stride-1 3x3 float32 ones with 64 or more channels (forward and
  input gradient), lax's otherwise; the kernel gradient as one im2col matmul.

  Args:
    x: `[B, H, W, Cin]`.
    kernel: `[kh, kw, Cin, Cout]`.
    strides: `(sh, sw)`.
    padding: `((top, bottom), (left, right))`.

  Returns:
    `[B, H', W', Cout]`, as `lax.conv_general_dilated`.
  """
  if _winograd_applies(x, kernel, strides, padding):
    return winograd_conv3x3(x, kernel, padding)
  return _lax_conv(x, kernel, strides, padding)


def _dense_conv_fwd(x, kernel, strides, padding):
  return dense_conv(x, kernel, strides, padding), (x, kernel)


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


dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


def _pairs(values: Sequence[int] | None) -> tuple[int, int]:
  return (1, 1) if values is None else tuple(int(v) for v in values)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
                         **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` for NHWC inputs and HWIO kernels, by the formulations above where one applies
  (stride-1 depthwise, stride-1 dilated dense, undilated dense), by lax otherwise.

  Args:
    lhs: `[B, H, W, Cin]`.
    rhs: `[kh, kw, Cin / groups, Cout]`.
    window_strides, padding, lhs_dilation, rhs_dilation, feature_group_count: as in lax.
    dimension_numbers, precision, kwargs: must describe the NHWC / HWIO layout; passed to lax where it is used.

  Returns:
    `[B, H', W', Cout]`.
  """
  strides, lhs_dil, rhs_dil = _pairs(window_strides), _pairs(lhs_dilation), _pairs(rhs_dilation)
  lax_call = functools.partial(jax.lax.conv_general_dilated, window_strides=strides, padding=padding,
                               lhs_dilation=lhs_dil, rhs_dilation=rhs_dil, dimension_numbers=dimension_numbers,
                               feature_group_count=feature_group_count, precision=precision, **kwargs)
  if (lhs.ndim != 4 or lhs_dil != (1, 1) or precision is not None or any(v is not None for v in kwargs.values())
      or (dimension_numbers is not None and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
          != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))):
    return lax_call(lhs, rhs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dil)],
                                      strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  channels = lhs.shape[-1]
  if strides == (1, 1) and feature_group_count == channels > 1 and rhs.shape[2:] == (1, channels):
    return depthwise_conv(lhs, rhs[:, :, 0], padding, rhs_dil)
  if feature_group_count == 1 and strides == (1, 1) and rhs_dil != (1, 1) and min(map(min, padding)) >= 0:
    return atrous_conv(lhs, rhs, padding, rhs_dil)
  if feature_group_count == 1 and rhs_dil == (1, 1):
    return dense_conv(lhs, rhs, strides, padding)
  return lax_call(lhs, rhs)
