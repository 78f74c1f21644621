"""kMaX-DeepLab assembled: exact parameter counts, output shapes, train / eval modes, bf16 and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from panoptic_jax.model.kmax_deeplab import abstract_model, build_model, get_config, param_breakdown

NUM_CLASSES = 7
SIZE = 65  # 32 * 2 + 1


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

@pytest.fixture(scope="module")
def tiny():
  return build_model("kmax_tiny", NUM_CLASSES, rngs=nnx.Rngs(0))

@nnx.jit
def _forward(model, images):
  return model(images)

@pytest.mark.slow
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
