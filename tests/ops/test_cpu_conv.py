"""The XLA:CPU convolutions equal lax's, in value and both gradients, for every case the model uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from panoptic_jax.ops import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _assert_conv_matches_lax(conv, x, w, strides, padding, **kw):
  """`conv` equals `lax.conv_general_dilated` in value (differentiated and plain call) and both gradients."""
  loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC, **kw)))
  want = jax.value_and_grad(loss(jax.lax.conv_general_dilated), (0, 1))(x, w)
  got = jax.value_and_grad(loss(conv), (0, 1))(x, w)
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(float(loss(conv)(x, w)), float(want[0]), rtol=1e-5, atol=1e-4)
  for g, e in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-4)


@pytest.mark.parametrize("kernel,dilation,padding", [(5, 1, ((2, 2), (2, 2))), (3, 2, ((2, 2), (2, 2))),
                                                     (3, 1, ((0, 2), (1, 0)))])
@pytest.mark.parametrize("block_rows", [None, 1, 2])
def test_depthwise_conv_matches_lax_with_gradients(kernel, dilation, padding, block_rows):
  """The shift-and-add depthwise convolution and its hand-written gradients equal lax's grouped convolution, also
  when training's forward and the kernel gradient run over blocks of 1 or 2 rows (the kernel gradient's last block
  padded)."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 6))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 6))
  if block_rows is None:
    conv = cpu_conv.conv_general_dilated
  else:
    out_w = 7 + sum(padding[1]) - dilation * (kernel - 1)
    elements = 2 * out_w * 6 * block_rows

    def conv(x, w, strides, padding, dimension_numbers, rhs_dilation, feature_group_count):
      del strides, dimension_numbers, feature_group_count
      return cpu_conv.depthwise_conv(x, w[:, :, 0], padding, rhs_dilation, train_block_elements=elements,
                                     grad_block_elements=elements)
  _assert_conv_matches_lax(conv, x, w, (1, 1), padding, rhs_dilation=(dilation, dilation), feature_group_count=6)


@pytest.mark.parametrize("size,rate,padding", [(9, 2, ((2, 2), (2, 2))), (9, 6, ((6, 6), (6, 6))),
                                               (7, 8, ((8, 8), (8, 8))), (9, 3, ((1, 4), (0, 3)))])
def test_atrous_conv_matches_lax_with_gradients(size, rate, padding):
  """The per-tap dilated convolution (taps that read only padding skipped: at rate 8 on 7 pixels all but the
  centre) equals lax's, value and both gradients, also for asymmetric padding."""
  x = jax.random.normal(jax.random.key(0), (2, size, size - 1, 5))
  w = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
  _assert_conv_matches_lax(cpu_conv.conv_general_dilated, x, w, (1, 1), padding, rhs_dilation=(rate, rate))


@pytest.mark.parametrize("kernel,stride,padding,channels", [(3, 1, ((1, 1), (1, 1)), (3, 4)),
                                                            (3, 2, ((1, 1), (1, 1)), (3, 4)),
                                                            (7, 2, ((3, 3), (3, 3)), (3, 4)),
                                                            (3, 1, ((0, 2), (1, 0)), (3, 4)),
                                                            (2, 2, "VALID", (3, 4)), (3, 2, "SAME", (3, 4)),
                                                            (3, 1, ((1, 1), (1, 1)), (64, 72)),
                                                            (3, 1, ((0, 2), (1, 0)), (72, 64))])
def test_dense_conv_matches_lax_with_gradients(kernel, stride, padding, channels):
  """The dense convolution (Winograd's for stride-1 3x3 with 64+ channels, the im2col kernel gradient) equals lax's,
  value and both gradients: stride 1 and 2, the 7x7 stem, asymmetric padding, ConvNeXt's patchify ("VALID") and
  string padding."""
  x = jax.random.normal(jax.random.key(0), (2, 11, 10, channels[0]))
  # Unit-variance outputs, as in a network: float rounding then stays well inside the tolerances.
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, *channels)) / np.sqrt(kernel * kernel * channels[0])
  _assert_conv_matches_lax(cpu_conv.conv_general_dilated, x, w, (stride, stride), padding)


@pytest.mark.parametrize("stride,groups,dilation", [(2, 8, 1), (2, 1, 2), (1, 2, 1)])
def test_other_convolutions_are_lax(stride, groups, dilation):
  """Strided depthwise, strided dilated and grouped (not depthwise) convolutions stay lax's: same HLO."""
  x = jax.random.normal(jax.random.key(0), (1, 9, 9, 8))
  w = jax.random.normal(jax.random.key(1), (3, 3, 8 // groups, 8))
  args = ((stride, stride), ((1, 1), (1, 1)))
  kw = dict(rhs_dilation=(dilation, dilation), feature_group_count=groups, dimension_numbers=NHWC)
  ours = jax.jit(lambda x, w: cpu_conv.conv_general_dilated(x, w, *args, **kw)).lower(x, w).as_text()
  lax = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, *args, **kw)).lower(x, w).as_text()
  assert ours.replace("lambda", "") == lax.replace("lambda", "")


@pytest.mark.parametrize("size,padding", [((9, 8), ((1, 1), (1, 1))), ((7, 10), ((0, 2), (2, 0))),
                                          ((6, 5), ((0, 0), (2, 2)))])
def test_winograd_conv3x3_is_as_accurate_as_lax(size, padding):
  """Winograd's F(2x2, 3x3) computes the 3x3 convolution to float32 rounding: against a float64 reference its error
  is within lax's (1.5x plus 1e-6 of slack), for odd and even output sizes (a cropped last tile), asymmetric and
  no padding."""
  x = np.random.RandomState(0).randn(2, *size, 48).astype(np.float32)
  w = (np.random.RandomState(1).randn(3, 3, 48, 24) / np.sqrt(9 * 48)).astype(np.float32)
  padded = np.pad(x.astype(np.float64), ((0, 0), *padding, (0, 0)))
  out_h, out_w = padded.shape[1] - 2, padded.shape[2] - 2
  want = sum(padded[:, i:i + out_h, j:j + out_w] @ w[i, j].astype(np.float64) for i in range(3) for j in range(3))
  got = np.asarray(jax.jit(cpu_conv.winograd_conv3x3, static_argnums=2)(x, w, padding))
  lax = np.asarray(jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC))
  assert got.shape == want.shape == (2, out_h, out_w, 24)
  assert np.abs(got - want).max() <= 1.5 * np.abs(lax - want).max() + 1e-6
