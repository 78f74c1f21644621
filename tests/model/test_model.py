"""kMaX-DeepLab model: parameter counts, shapes, modes, k-means assignment, sharding, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from panoptic_jax.model import layers as L
from panoptic_jax.model.kmax_decoder import KMaXBlock, kmeans_assignment
from panoptic_jax.model.kmax_deeplab import abstract_model, build_model, get_config, param_breakdown
from panoptic_jax.model.pixel_decoder import MAX_SPAN, relative_embeddings
from panoptic_jax.model.sharding_rules import DEFAULT_AXIS_RULES, param_shardings

NUM_CLASSES = 7
SIZE = 65  # 32 * 2 + 1
NHWC = ("NHWC", "HWIO", "NHWC")


def _images(batch, size=SIZE, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 256, (batch, size, size, 3)).astype(np.uint8))


def test_param_counts_r50_coco_exact():
  parts = param_breakdown(abstract_model("kmax_r50_coco", 133))
  assert parts["backbone"] == 23_508_032
  assert parts["pixel_decoder"] == 21_151_040
  assert parts["transformer_decoder_and_heads"] == 11_921_048
  assert parts["total_without_aux"] == 56_580_120
  assert parts["aux_semantic_head"] == 15_856_742
  assert parts["total_with_aux"] == 72_436_862


@pytest.mark.parametrize("preset,classes,backbone,pixel,decoder", [
    ("kmax_r50_cityscapes", 19, 23.51e6, 21.18e6, 11.71e6),
    ("kmax_convnext_t_coco", 133, 27.82e6, 21.20e6, 11.92e6),
])
def test_param_counts_other_presets(preset, classes, backbone, pixel, decoder):
  parts = param_breakdown(abstract_model(preset, classes))
  for key, want in (("backbone", backbone), ("pixel_decoder", pixel), ("transformer_decoder_and_heads", decoder)):
    assert abs(parts[key] - want) / want < 0.005, (key, parts[key], want)


def test_every_param_has_logical_names():
  state = nnx.state(abstract_model("kmax_tiny", NUM_CLASSES), nnx.Param)
  for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.get_value().shape), path


@pytest.mark.parametrize("length", [1, 2, 5, 17, 41])
def test_relative_embeddings_equal_gather(length):
  table = jax.random.normal(jax.random.key(0), (2 * MAX_SPAN - 1, 3))
  idx = np.arange(length)[None, :] - np.arange(length)[:, None] + MAX_SPAN - 1
  np.testing.assert_array_equal(np.asarray(relative_embeddings(table, length)), np.asarray(table)[idx])


def test_resize_align_corners_and_half_pixel():
  x = jnp.arange(3.0).reshape(1, 3, 1, 1)
  y = L.resize_bilinear(x, (5, 1), align_corners=True)
  np.testing.assert_allclose(np.asarray(y).ravel(), [0, 0.5, 1, 1.5, 2])
  x = jax.random.normal(jax.random.key(1), (2, 6, 8, 3))
  y = L.resize_bilinear(x, (12, 16), align_corners=False)
  np.testing.assert_allclose(np.asarray(y), np.asarray(jax.image.resize(x, (2, 12, 16, 3), "bilinear")), atol=1e-5)


@pytest.mark.parametrize("size_in,size_out", [(3, 5), (11, 81), (21, 161), (41, 161), (5, 12), (1, 4)])
def test_resize_align_corners_matches_interpolation_matrix(size_in, size_out):
  """The integer-factor fast path (2, 4, 8 in kMaX) and the matrix path give the interpolation-matrix product."""
  x = jax.random.normal(jax.random.key(2), (2, size_in, size_in + 2, 3))
  y = L.resize_bilinear(x, (size_out, size_out + 2), align_corners=True)
  mh = L._interp_matrix(size_in, size_out, True)
  mw = L._interp_matrix(size_in + 2, size_out + 2, True)
  np.testing.assert_allclose(np.asarray(y), np.einsum("oh,pw,bhwc->bopc", mh, mw, np.asarray(x)), atol=1e-5)


@pytest.mark.parametrize("size_in,size_out,align", [((6, 9), (21, 33), True), ((3, 4), (9, 10), None),
                                                   ((5, 6), (12, 9), False), ((4, 4), (4, 4), None)])
def test_sample_bilinear_reads_the_resized_map(size_in, size_out, align):
  """Sampling pixels of the upsampled grid equals resizing the whole map and gathering them (both align-corners
  settings, integer and other factors, equal sizes), with the same gradient."""
  x = jax.random.normal(jax.random.key(0), (2, *size_in, 3))
  rows = jax.random.randint(jax.random.key(1), (2, 17), 0, size_out[0])
  cols = jax.random.randint(jax.random.key(2), (2, 17), 0, size_out[1])

  def gathered(x):
    full = L.resize_bilinear(x, size_out, align)
    return full[jnp.arange(2)[:, None], rows, cols]

  got = L.sample_bilinear(x, rows, cols, size_out, align)
  np.testing.assert_allclose(np.asarray(got), np.asarray(gathered(x)), atol=1e-6)
  weights = jax.random.normal(jax.random.key(3), got.shape)
  g_got = jax.grad(lambda x: jnp.sum(L.sample_bilinear(x, rows, cols, size_out, align) * weights))(x)
  g_want = jax.grad(lambda x: jnp.sum(gathered(x) * weights))(x)
  np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=1e-5)


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
def test_depthwise_conv_matches_lax_with_gradients(kernel, dilation, padding, block_rows, monkeypatch):
  """The CPU shift-and-add depthwise convolution and its hand-written gradients equal lax's grouped convolution,
  also when training's forward and the kernel gradient run over blocks of 1 or 2 rows (the kernel gradient's last
  block padded)."""
  if block_rows is not None:
    out_w = 7 + sum(padding[1]) - dilation * (kernel - 1)
    monkeypatch.setattr(L, "_kernel_grad", functools.partial(L._kernel_grad, block_elements=2 * out_w * 6 * block_rows))
    monkeypatch.setattr(L, "_TRAIN_BLOCK_ELEMENTS", 2 * out_w * 6 * block_rows)
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 6))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 6))
  _assert_conv_matches_lax(L.depthwise_conv_general_dilated, x, w, (1, 1), padding,
                           rhs_dilation=(dilation, dilation), feature_group_count=6)


@pytest.mark.parametrize("size,rate,padding", [(9, 2, ((2, 2), (2, 2))), (9, 6, ((6, 6), (6, 6))),
                                               (7, 8, ((8, 8), (8, 8))), (9, 3, ((1, 4), (0, 3)))])
def test_atrous_conv_matches_lax_with_gradients(size, rate, padding):
  """The CPU per-tap dilated convolution (taps that read only padding skipped: at rate 8 on 7 pixels all but the
  centre) equals lax's, value and both gradients, also for asymmetric padding."""
  x = jax.random.normal(jax.random.key(0), (2, size, size - 1, 5))
  w = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
  _assert_conv_matches_lax(L.atrous_conv_general_dilated, x, w, (1, 1), padding, rhs_dilation=(rate, rate))
  with pytest.raises(ValueError, match="stride-1 dense NHWC"):
    L.atrous_conv_general_dilated(x, w, (2, 2), padding, rhs_dilation=(rate, rate))


@pytest.mark.parametrize("kernel,stride,padding,channels", [(3, 1, ((1, 1), (1, 1)), (3, 4)),
                                                            (3, 2, ((1, 1), (1, 1)), (3, 4)),
                                                            (7, 2, ((3, 3), (3, 3)), (3, 4)),
                                                            (3, 1, ((0, 2), (1, 0)), (3, 4)),
                                                            (2, 2, "VALID", (3, 4)), (3, 2, "SAME", (3, 4)),
                                                            (3, 1, ((1, 1), (1, 1)), (64, 72)),
                                                            (3, 1, ((0, 2), (1, 0)), (72, 64))])
def test_dense_conv_matches_lax_with_gradients(kernel, stride, padding, channels):
  """The CPU dense convolution (Winograd's for stride-1 3x3 with 64+ channels, the im2col kernel gradient) equals
  lax's, value and both gradients: stride 1 and 2, the 7x7 stem, asymmetric padding, ConvNeXt's patchify ("VALID")
  and string padding."""
  x = jax.random.normal(jax.random.key(0), (2, 11, 10, channels[0]))
  # Unit-variance outputs, as in a network: float rounding then stays well inside the tolerances.
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, *channels)) / np.sqrt(kernel * kernel * channels[0])
  _assert_conv_matches_lax(L.dense_conv_general_dilated, x, w, (stride, stride), padding)
  with pytest.raises(ValueError, match="dense undilated NHWC"):
    L.dense_conv_general_dilated(x, w, (1, 1), padding, rhs_dilation=(2, 2))


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
  got = np.asarray(jax.jit(L.winograd_conv3x3, static_argnums=2)(x, w, padding))
  lax = np.asarray(jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC))
  assert got.shape == want.shape == (2, out_h, out_w, 24)
  assert np.abs(got - want).max() <= 1.5 * np.abs(lax - want).max() + 1e-6


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ynn_boundary_changes_no_bit_and_passes_gradients(dtype):
  """The fusion boundaries (forward: GELU, the depthwise sum; backward: the decoder's LayerNorms) are identities in
  value (bit for bit) and gradient."""
  x = jax.random.normal(jax.random.key(0), (4, 33), dtype) * 100
  y = jax.jit(L.ynn_boundary)(x)
  assert y.dtype == dtype
  np.testing.assert_array_equal(np.asarray(y).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32),
                                np.asarray(x).view(np.uint16 if dtype == jnp.bfloat16 else np.uint32))
  g = jax.grad(lambda v: jnp.sum(jnp.sin(L.ynn_boundary(v).astype(jnp.float32))))(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(jnp.cos(x.astype(jnp.float32)).astype(dtype)))
  # Its backward-only form: identity in value and gradient too.
  np.testing.assert_array_equal(np.asarray(jax.jit(L.ynn_grad_boundary)(x)), np.asarray(x))
  g = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(L.ynn_grad_boundary(v).astype(jnp.float32)))))(x)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(jnp.cos(x.astype(jnp.float32)).astype(dtype)))
  np.testing.assert_allclose(np.asarray(L.gelu(jnp.linspace(-4, 4, 17))),
                             np.asarray(jax.nn.gelu(jnp.linspace(-4, 4, 17), approximate=False)), atol=1e-6)


def test_cpu_convolution_choice():
  """On CPU, stride-1 depthwise convs avoid XLA's dense kernel gradient (C times the work), stride-1 dilated
  dense convs skip the taps that read padding, undilated dense convs take an im2col kernel gradient; others stay
  lax."""
  rngs = nnx.Rngs(0)
  with nnx.use_eager_sharding(False):
    assert L.conv(8, 8, 5, groups=8, rngs=rngs).conv_general_dilated is L.depthwise_conv_general_dilated
    assert L.conv(8, 4, 3, dilation=6, rngs=rngs).conv_general_dilated is L.atrous_conv_general_dilated
    assert L.conv(8, 4, 3, dilation=6, stride=2, rngs=rngs).conv_general_dilated is jax.lax.conv_general_dilated
    assert L.conv(8, 8, 3, rngs=rngs).conv_general_dilated is L.dense_conv_general_dilated
    assert L.conv(3, 8, 7, stride=2, rngs=rngs).conv_general_dilated is L.dense_conv_general_dilated
    assert L.conv(8, 8, 3, stride=2, groups=8, rngs=rngs).conv_general_dilated is jax.lax.conv_general_dilated


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_layer_matches_lax_with_gradients_and_no_transposed_cotangent(dtype):
  """1x1 convs (nnx.Linear) get their kernel gradient straight from the [P, C] layouts: same values as lax's rule."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 16), dtype)
  w = jax.random.normal(jax.random.key(1), (16, 24), dtype)
  loss = lambda dot: lambda x, w: jnp.sum(jnp.sin(dot(x, w, (((3,), (0,)), ((), ()))).astype(jnp.float32)))
  want = jax.value_and_grad(loss(jax.lax.dot_general), (0, 1))(x, w)
  got = jax.value_and_grad(loss(L.dense_dot_general), (0, 1))(x, w)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=tol)
  for g, e in zip(got[1], want[1]):
    assert g.dtype == dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), rtol=tol, atol=tol)
  with nnx.use_eager_sharding(False):
    assert L.dense(16, 24, rngs=nnx.Rngs(0)).dot_general is L.dense_dot_general
  # The transpose XLA:CPU would materialise: a [24, 126] copy of the [2, 9, 7, 24] cotangent.
  hlo = jax.jit(jax.grad(loss(L.dense_dot_general), 1)).lower(x, w).compile().as_text()
  assert not [line for line in hlo.splitlines() if "transpose(" in line and "[24,2,9,7]" in line]


@pytest.mark.parametrize("axis", [2, -1])
def test_batch_norm_sum_of_parts_equals_concatenated_norm(axis):
  """The axial attention's BatchNorm of parts side by side, summed part by part: the same values in training (batch
  statistics, running averages updated) and in eval (each part its slice of the affine map, no concatenation)."""
  keys = jax.random.split(jax.random.key(0), 3)
  parts = [jax.random.normal(k, (2, 5, 4, 6, 6)) * (i + 1) + i for i, k in enumerate(keys)]
  channels = 3 * parts[0].shape[axis]

  def reference(bn):
    normed = bn(jnp.concatenate(parts, axis=axis))
    return sum(jnp.split(normed, 3, axis=axis))

  with nnx.use_eager_sharding(False):
    bn, ref_bn = (L.batch_norm(channels, axis=axis, rngs=nnx.Rngs(0)) for _ in range(2))
  for b in (bn, ref_bn):
    b.scale.set_value(jnp.linspace(0.5, 2.0, channels))
    b.bias.set_value(jnp.linspace(-1.0, 1.0, channels))
  np.testing.assert_allclose(np.asarray(bn.sum_of_parts(parts)), np.asarray(reference(ref_bn)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(bn.var.get_value()), np.asarray(ref_bn.var.get_value()), rtol=1e-6)
  assert not np.allclose(np.asarray(bn.var.get_value()), 1.0)  # The training call updated the statistics.
  bn.use_running_average = ref_bn.use_running_average = True
  got = jax.jit(lambda: bn.sum_of_parts(parts))()
  np.testing.assert_allclose(np.asarray(got), np.asarray(reference(ref_bn)), rtol=1e-5, atol=1e-5)
  hlo = jax.jit(lambda: bn.sum_of_parts(parts)).lower().compile().as_text()
  assert "concatenate(" not in hlo


def test_kmeans_assignment_is_hard_and_stops_gradient():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
  a = kmeans_assignment(logits)
  np.testing.assert_array_equal(np.asarray(a.sum(-1)), 1.0)
  np.testing.assert_array_equal(np.asarray(a.argmax(-1)), np.asarray(logits.argmax(-1)))
  g = jax.grad(lambda l: jnp.sum(kmeans_assignment(l) * jnp.arange(4.0)))(logits)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_kmax_block_predictor_gets_no_gradient_through_assignment():
  """The block's output centres depend on its auxiliary predictor only through the (stopped) assignment."""
  with nnx.use_eager_sharding(False):   # no mesh here: keep the logical names as metadata only
    block = KMaXBlock(8, 5, query_ch=16, bottleneck=16, key_depth=8, value_depth=16, num_heads=2, ffn=32,
                      embed=8, hidden=16, rngs=nnx.Rngs(0))
  pixel = jax.random.normal(jax.random.key(1), (2, 5, 5, 8))
  centres = jax.random.normal(jax.random.key(2), (2, 6, 16))

  def loss(block):
    new, _ = block(pixel, centres)
    return jnp.sum(new ** 2)

  grads = nnx.jit(nnx.grad(loss))(block)
  pred_grads = jax.tree.leaves(grads["predictor"])
  assert pred_grads and all(float(jnp.abs(g).max()) == 0.0 for g in pred_grads)
  # The k-means update itself is trained (its last BN gamma is zero at init, so only that gets a gradient now).
  assert float(jnp.abs(grads["kmeans_conv3"]["norm"]["scale"][...]).max()) > 0.0


@pytest.fixture(scope="module")
def tiny():
  return build_model("kmax_tiny", NUM_CLASSES, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, images):
  return model(images)


def test_tiny_train_then_eval(tiny):
  """COCO-like (stride 4) shapes; train mode updates BN statistics and adds the semantic head, eval does neither."""
  cfg = get_config("kmax_tiny")
  n, h = cfg.num_slots, (SIZE - 1) // 4 + 1
  images = _images(2)
  stats0 = jax.tree.map(np.asarray, nnx.state(tiny, nnx.BatchStat))
  tiny.train()
  out = _forward(tiny, images)
  assert out["class_logits"].shape == (2, n, NUM_CLASSES + 1)
  assert out["mask_logits"].shape == (2, h, h, n)
  assert out["pixel_feature"].shape == (2, h, h, cfg.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out["pixel_feature"]), axis=-1), 1.0, rtol=1e-4)
  assert len(out["aux_outputs"]) == sum(cfg.decoder_blocks)
  strides = [s for s, blocks in zip((32, 16, 8), cfg.decoder_blocks) for _ in range(blocks)]
  for aux, stride in zip(out["aux_outputs"], strides):
    assert aux["mask_logits"].shape == (2, h, h, n) and aux["class_logits"].shape == (2, n, NUM_CLASSES + 1)
    side = (SIZE - 1) // stride + 1  # Pixel features stay at the block's stride (the losses sample them).
    assert aux["pixel_feature"].shape == (2, side, side, cfg.embed_dim)
  assert out["semantic_logits"].shape == (2, h, h, NUM_CLASSES + 1)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
  stats1 = jax.tree.map(np.asarray, nnx.state(tiny, nnx.BatchStat))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats1))]
  assert all(changed)

  tiny.eval()
  out_a = _forward(tiny, images)
  out_b = _forward(tiny, images)
  assert "semantic_logits" not in out_a
  stats2 = jax.tree.map(np.asarray, nnx.state(tiny, nnx.BatchStat))
  for a, b in zip(jax.tree.leaves(stats1), jax.tree.leaves(stats2)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.asarray(out_a["mask_logits"]), np.asarray(out_b["mask_logits"]))
  # Class logits start biased towards void.
  assert bool(jnp.all(jnp.argmax(out_a["class_logits"], -1) == NUM_CLASSES))


def test_tiny_cityscapes_stride2_shapes():
  model = build_model("kmax_tiny_cityscapes", NUM_CLASSES, rngs=nnx.Rngs(0))
  model.eval()
  out = nnx.jit(lambda m, x: m(x, with_semantic=True))(model, _images(1))
  n, h = get_config("kmax_tiny_cityscapes").num_slots, (SIZE - 1) // 2 + 1
  assert out["mask_logits"].shape == (1, h, h, n)
  assert out["pixel_feature"].shape[:3] == (1, h, h)
  assert out["semantic_logits"].shape == (1, 3, 3, NUM_CLASSES + 1)   # head-only semantic predictor at stride 32


def test_sharded_8_devices_matches_single_device(tiny):
  assert jax.device_count() >= 8, "conftest sets 8 fake CPU devices"
  model = tiny
  model.eval()
  images = _images(8, seed=3)
  graphdef, state = nnx.split(model)

  def fwd(state, x):
    return nnx.merge(graphdef, state)(x)

  single = jax.jit(fwd)(state, images)
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  shardings = param_shardings(state, mesh, DEFAULT_AXIS_RULES)
  assert any(s.spec != P() for s in jax.tree.leaves(shardings))           # FSDP actually shards something
  sharded_state = jax.device_put(state, shardings)
  x = jax.device_put(images, NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    multi = jax.jit(fwd)(sharded_state, x)
  for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(multi)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_bf16_compute_with_f32_params_and_remat():
  """bf16 compute, f32 parameters, rematerialised stages."""
  # Same parameters as the f32 model (the structure does not depend on the dtype): no second initialisation.
  model = nnx.merge(nnx.graphdef(abstract_model("kmax_tiny", NUM_CLASSES, dtype="bfloat16", remat=True)),
                    nnx.state(build_model("kmax_tiny", NUM_CLASSES, rngs=nnx.Rngs(0))))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  model.eval()
  out = _forward(model, _images(1))
  assert out["mask_logits"].dtype == jnp.float32
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(out))
