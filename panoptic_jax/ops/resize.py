"""Bilinear resizing: the one implementation that the model, the losses and the post-processing share.

Conventions (PyTorch's `F.interpolate(mode="bilinear")` for both corner settings):
- `align_corners=True`: output `o` reads input position `o * (n_in - 1) / (n_out - 1)` (corner pixels coincide);
- `align_corners=False`: output `o` reads `(o + 0.5) * n_in / n_out - 0.5`, clamped at 0 (half-pixel centres).
`align_corners=None` chooses kMaX-DeepLab's rule: corners aligned where every `n_out - 1` is a multiple of `n_in - 1`,
i.e. on the `stride * k + 1` grids of kMaX's crops (641, 1281, 1025x2049), where a stride-s feature at index i lies
exactly on image pixel `s * i`; half-pixel centres otherwise.

Two dimensions are resized width first, then height (PyTorch's order of operations), so that the model, the losses'
sampled pixels and the post-processing's blockwise upsampling compute the same floats. An integer-factor upsampling
(every kMaX resize) is slices and one multiply-add per output; other factors multiply by the `[n_out, n_in]`
interpolation matrix. Neither gathers, so both export to any runtime.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def integer_factor(n_in: int, n_out: int, align_corners: bool) -> int | None:
  """k when resizing n_in to n_out with aligned corners puts output `k * i` on input i; None otherwise."""
  if align_corners and n_in > 1 and n_out > n_in and (n_out - 1) % (n_in - 1) == 0:
    return (n_out - 1) // (n_in - 1)
  return None


def corners_aligned(in_size: Sequence[int], out_size: Sequence[int]) -> bool:
  """kMaX's rule (`align_corners=None`): corners aligned when every axis is an integer-factor upsampling of a
  `stride * k + 1` grid."""
  return all(integer_factor(n, m, True) is not None or n == m for n, m in zip(in_size, out_size))


@functools.lru_cache(maxsize=None)
def taps(n_in: int, n_out: int, align_corners: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The two input positions and the weight of the second for every output position.

  Returns:
    `(lo, hi, frac)`, each `[n_out]` (int32, int32, float32): output `o` is `x[lo[o]] (1 - frac[o]) + x[hi[o]]
    frac[o]`. Integer factors are computed exactly (`lo = o // k`, `frac = (o % k) / k`).
  """
  out = np.arange(n_out)
  k = integer_factor(n_in, n_out, align_corners)
  if k is not None:
    lo, frac = out // k, (out % k) / k
  else:
    if n_in == 1:
      src = np.zeros(n_out)
    elif align_corners:
      src = out * ((n_in - 1) / max(n_out - 1, 1))
    else:
      src = np.maximum((out + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    frac = src - lo
  hi = np.minimum(lo + 1, n_in - 1)
  return lo.astype(np.int32), hi.astype(np.int32), frac.astype(np.float32)


def lerp(low: jax.Array, high: jax.Array, frac: jax.Array) -> jax.Array:
  """`low (1 - frac) + high frac`: the one interpolation step every resize and sample here is made of."""
  return low * (1 - frac) + high * frac


def lerp_along(x: jax.Array, axis: int, lo: jax.Array, hi: jax.Array, frac: jax.Array) -> jax.Array:
  """`lerp(x[lo], x[hi], frac)` along `axis` for `[n]` index and weight arrays (which may be traced)."""
  frac = frac.reshape([frac.size if a == axis else 1 for a in range(x.ndim)]).astype(x.dtype)
  return lerp(jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis), frac)


def _upsample_integer(x: jax.Array, axis: int, n_out: int, k: int) -> jax.Array:
  """Output `k * i + r` is `lerp(x[i], x[i + 1], r / k)`, with `x[n_in] := x[n_in - 1]`.

  Slices and broadcasts only, the whole output in one expression: gathers, or a concatenation of the last output
  row, made XLA:CPU's fused loops index or branch per element.
  """
  n_in = x.shape[axis]
  shape = [1] * (x.ndim + 1)
  shape[axis + 1] = k
  frac = (jnp.arange(k, dtype=jnp.float32) / k).reshape(shape).astype(x.dtype)
  padded = jnp.concatenate([x, lax.slice_in_dim(x, n_in - 1, n_in, axis=axis)], axis=axis)
  low = jnp.expand_dims(lax.slice_in_dim(padded, 0, n_in, axis=axis), axis + 1)
  high = jnp.expand_dims(lax.slice_in_dim(padded, 1, n_in + 1, axis=axis), axis + 1)
  out = lerp(low, high, frac).reshape(*x.shape[:axis], n_in * k, *x.shape[axis + 1:])
  return lax.slice_in_dim(out, 0, n_out, axis=axis)


def interpolation_matrix(n_in: int, n_out: int, align_corners: bool) -> np.ndarray:
  """`[n_out, n_in]` float32 bilinear weights (`taps` as a matrix)."""
  lo, hi, frac = taps(n_in, n_out, align_corners)
  m = np.zeros((n_out, n_in), np.float32)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m


def resize_axis(x: jax.Array, axis: int, n_out: int, align_corners: bool) -> jax.Array:
  """Bilinear resize of one axis of `x` to `n_out`."""
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  k = integer_factor(n_in, n_out, align_corners)
  if k is not None:
    return _upsample_integer(x, axis, n_out, k)
  m = jnp.asarray(interpolation_matrix(n_in, n_out, align_corners), x.dtype)
  # HIGHEST: accelerators would otherwise round a float32 product's inputs to bfloat16 / TF32.
  return jnp.moveaxis(jnp.tensordot(m, x, axes=(1, axis), precision=lax.Precision.HIGHEST), 0, axis)


def resize_bilinear(x: jax.Array, size: Sequence[int], align_corners: bool | None = None) -> jax.Array:
  """Bilinear resize of `[B, H, W, C]` to `[B, h, w, C]`, width first (see the module docstring).

  Args:
    x: `[B, H, W, C]`.
    size: `(h, w)`.
    align_corners: True, False, or None for kMaX's rule (`corners_aligned`).
  """
  h, w = int(size[0]), int(size[1])
  if align_corners is None:
    align_corners = corners_aligned(x.shape[1:3], (h, w))
  return resize_axis(resize_axis(x, 2, w, align_corners), 1, h, align_corners)


def sample_bilinear(x: jax.Array, rows: jax.Array, cols: jax.Array, size: Sequence[int],
                    align_corners: bool | None = None) -> jax.Array:
  """`resize_bilinear(x, size, align_corners)[b, rows[b, k], cols[b, k]]` -> `[B, K, C]`, without the resized map.

  Four gathers of `x` per sample and the same weights, in the same order, as `resize_bilinear`. The kMaX losses read
  a few thousand pixels of each auxiliary pixel embedding: this skips resizing whole maps and the gradient of that.

  Args:
    x: `[B, H, W, C]`.
    rows, cols: `[B, K]` integer positions on the `size` grid.
    size: `(h, w)` of the grid the positions refer to.
    align_corners: as in `resize_bilinear`.
  """
  batch, height, width, channels = x.shape
  flat = x.reshape(batch, height * width, channels)
  pixel = lambda r, c: jnp.take_along_axis(flat, (r * width + c)[..., None], axis=1)  # noqa: E731
  if (height, width) == tuple(size):
    return pixel(rows, cols)
  if align_corners is None:
    align_corners = corners_aligned((height, width), size)
  (r0, r1, fr), (c0, c1, fc) = ([jnp.asarray(t)[index] for t in taps(n, int(out), align_corners)]
                                for n, out, index in ((height, size[0], rows), (width, size[1], cols)))
  fr, fc = fr[..., None].astype(x.dtype), fc[..., None].astype(x.dtype)
  return lerp(lerp(pixel(r0, c0), pixel(r0, c1), fc), lerp(pixel(r1, c0), pixel(r1, c1), fc), fr)
