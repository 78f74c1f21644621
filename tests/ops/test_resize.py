"""The one bilinear resize: PyTorch's conventions, kMaX's corner rule, and sampling that reads the resized map."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panoptic_jax.ops import resize


def _loop_resize(x: np.ndarray, size, align_corners: bool) -> np.ndarray:
  """F.interpolate(mode="bilinear") written out per output pixel, in float64 ([H, W, C])."""
  (h, w), (big_h, big_w) = x.shape[:2], size

  def source(o, n_in, n_out):
    if align_corners:
      return o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    return max((o + 0.5) * n_in / n_out - 0.5, 0.0)

  out = np.zeros((big_h, big_w, x.shape[2]))
  for i in range(big_h):
    for j in range(big_w):
      y, xx = source(i, h, big_h), source(j, w, big_w)
      y0, x0 = min(int(np.floor(y)), h - 1), min(int(np.floor(xx)), w - 1)
      y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
      fy, fx = y - y0, xx - x0
      out[i, j] = ((1 - fy) * (1 - fx) * x[y0, x0] + (1 - fy) * fx * x[y0, x1] + fy * (1 - fx) * x[y1, x0]
                   + fy * fx * x[y1, x1])
  return out


@pytest.mark.parametrize("size_in,size_out,align", [
    ((5, 4), (17, 13), True),     # Integer factors 4 and 4 (a stride-4 map of a 17x13 input).
    ((3, 6), (65, 21), True),     # Factors 32 and 4.
    ((6, 8), (12, 16), False),    # Half-pixel centres, as jax.image.resize.
    ((5, 6), (12, 9), False),     # Other factors, one of them a downsampling.
    ((4, 5), (9, 11), True),      # Aligned corners at non-integer factors (the interpolation matrix).
    ((1, 3), (4, 9), True),       # A single row.
])
def test_resize_is_pytorch_bilinear(size_in, size_out, align):
  x = np.random.default_rng(0).normal(size=(1, *size_in, 3)).astype(np.float32)
  got = np.asarray(resize.resize_bilinear(jnp.asarray(x), size_out, align))
  np.testing.assert_allclose(got[0], _loop_resize(x[0].astype(np.float64), size_out, align), rtol=1e-5, atol=1e-5)
  if not align:
    np.testing.assert_allclose(got, np.asarray(jax.image.resize(x, (1, *size_out, 3), "bilinear")), atol=1e-5)


@pytest.mark.parametrize("size_in,size_out,aligned", [
    ((21, 21), (161, 161), True),   # 641 crop: stride 32 -> 4.
    ((4, 4), (25, 25), True),       # 97 crop (32 * 3 + 1): stride 32 -> 4, an even feature map.
    ((3, 5), (9, 17), True),        # 65x129 crop: stride 32 -> 8.
    ((16, 16), (64, 64), False),    # 64 crop: not a stride * k + 1 grid.
    ((5, 5), (12, 12), False),
])
def test_kmax_rule_aligns_corners_exactly_on_stride_grids(size_in, size_out, aligned):
  """`align_corners=None` aligns corners on every `stride * k + 1` grid (odd or even feature maps), and the aligned
  upsampling puts input pixel i on output pixel `k * i` exactly."""
  assert resize.corners_aligned(size_in, size_out) == aligned
  x = jax.random.normal(jax.random.key(0), (2, *size_in, 3))
  y = np.asarray(resize.resize_bilinear(x, size_out))
  if aligned:
    kh, kw = ((o - 1) // (i - 1) for i, o in zip(size_in, size_out))
    np.testing.assert_array_equal(y[:, ::kh, ::kw], np.asarray(x))


@pytest.mark.parametrize("size_in,size_out,align", [((6, 9), (21, 33), True), ((3, 4), (9, 10), None),
                                                   ((5, 6), (12, 9), False), ((4, 4), (4, 4), None)])
def test_sample_bilinear_reads_the_resized_map(size_in, size_out, align):
  """Sampling pixels of the upsampled grid equals resizing the whole map and gathering them (both corner settings,
  integer and other factors, equal sizes), with the same gradient."""
  x = jax.random.normal(jax.random.key(0), (2, *size_in, 3))
  rows = jax.random.randint(jax.random.key(1), (2, 17), 0, size_out[0])
  cols = jax.random.randint(jax.random.key(2), (2, 17), 0, size_out[1])

  def gathered(x):
    full = resize.resize_bilinear(x, size_out, align)
    return full[jnp.arange(2)[:, None], rows, cols]

  got = resize.sample_bilinear(x, rows, cols, size_out, align)
  np.testing.assert_allclose(np.asarray(got), np.asarray(gathered(x)), atol=1e-6)
  weights = jax.random.normal(jax.random.key(3), got.shape)
  g_got = jax.grad(lambda x: jnp.sum(resize.sample_bilinear(x, rows, cols, size_out, align) * weights))(x)
  g_want = jax.grad(lambda x: jnp.sum(gathered(x) * weights))(x)
  np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-5)


def test_rows_lerped_from_taps_equal_the_resize():
  """Post-processing blends rows of a width-resized map with `taps` (`lerp_along`): the resize's values (to float32
  rounding: XLA may fuse the multiply-adds of either differently)."""
  x = jax.random.normal(jax.random.key(0), (9, 17, 5))
  for size, align in (((33, 65), True), ((20, 40), False)):
    wide = resize.resize_axis(x, 1, size[1], align)
    rows = resize.lerp_along(wide, 0, *(jnp.asarray(t) for t in resize.taps(9, size[0], align)))
    np.testing.assert_allclose(np.asarray(rows), np.asarray(resize.resize_bilinear(x[None], size, align)[0]),
                               rtol=1e-6, atol=1e-6)
