"""ONNX export of the network: onnxruntime's logits against the JAX model's, with a symbolic batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

from panoptic_jax.inference import onnx_export  # noqa: E402
from panoptic_jax.model import kmax_deeplab  # noqa: E402

HW = (65, 97)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  model = kmax_deeplab.build_model("kmax_tiny", num_classes=5, rngs=nnx.Rngs(0))
  model.eval()
  path = str(tmp_path_factory.mktemp("onnx") / "kmax_tiny.onnx")
  return model, path, onnx_export.export_onnx(model, HW, path)


@pytest.mark.slow
def test_onnxruntime_matches_jax_for_any_batch(tiny):
  """One export with a symbolic batch runs B = 1 and B = 3; both logits within 1e-4 of `model(images)`, on logits of
  a scale where 1e-4 means something (mask logits of an untrained model are ~0.1, class logits ~4)."""
  model, path, info = tiny
  assert info["inputs"] == {"images": ["B", *HW, 3]}
  assert info["outputs"] == {"mask_logits": ["B", 17, 25, 16], "class_logits": ["B", 16, 6]}
  assert info["max_pools_legalized"] == 1 and "Conv" in info["op_types"]
  session = onnx_export.load_session(path)
  forward = nnx.jit(lambda m, x: m(x))
  for batch in (1, 3):
    images = np.random.RandomState(batch).uniform(0, 255, (batch, *HW, 3)).astype(np.float32)
    got = onnx_export.run_onnx(session, images)
    want = forward(model, jnp.asarray(images))
    for name in onnx_export.OUTPUT_NAMES:
      expected = np.asarray(want[name])
      assert got[name].shape == expected.shape
      assert np.abs(expected).max() > 0.05, name
      np.testing.assert_allclose(got[name], expected, rtol=0, atol=1e-4, err_msg=name)


def test_training_mode_is_refused(tmp_path):
  model = kmax_deeplab.build_model("kmax_tiny", num_classes=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="model.eval"):
    onnx_export.export_onnx(model, HW, str(tmp_path / "m.onnx"))


def test_nhwc_max_pool_is_legalized_for_onnxruntime(tmp_path):
  """jax2onnx writes an NHWC (1, 3, 3, 1) max pool as a 4-D MaxPool, which onnxruntime cannot run; after the
  rewrite it runs and matches lax (padding included)."""
  import onnx
  from jax2onnx import to_onnx

  def pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))

  proto = to_onnx(pool, inputs=[(2, 9, 7, 4)], opset=onnx_export.DEFAULT_OPSET)
  assert onnx_export._legalize_max_pool(proto) == 1
  path = str(tmp_path / "pool.onnx")
  onnx.save(proto, path)
  x = np.random.RandomState(0).randn(2, 9, 7, 4).astype(np.float32)
  session = onnx_export.load_session(path)
  (got,) = session.run(None, {session.get_inputs()[0].name: x})
  np.testing.assert_array_equal(got, np.asarray(pool(jnp.asarray(x))))
