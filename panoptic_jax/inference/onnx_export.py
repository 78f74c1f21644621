"""ONNX export of the kMaX-DeepLab network (image -> mask and class logits), for onnxruntime / TensorRT users.

    info = export_onnx(model, (641, 641), "kmax.onnx")          # model.eval() first
    outputs = run_onnx("kmax.onnx", images)                       # images [B, 641, 641, 3], 0..255

The ONNX graph has one input and two outputs (B symbolic unless `dynamic_batch=False`; h = (H - 1) // 4 + 1 for the
output stride 4 presets, N = num_slots, K = num_classes):

    images        [B, H, W, 3]   float32 or uint8, 0..255 (the model's input contract)
    mask_logits   [B, h, w, N]   float32
    class_logits  [B, N, K + 1]  float32, void last

The converter is jax2onnx (pinned in requirements-onnx.txt, installed without its dependencies), run on the program
traced inside `ops.portable()`: the plain-lax form GPUs run (convolutions, matmuls), not XLA:CPU's Winograd kernels
and fusion barriers. One fix-up follows it (`_legalize_max_pool`): jax2onnx writes the stem's NHWC 3x3 max pool as a
4-D MaxPool over [1, 1, B, H, W, C], which ONNX allows but onnxruntime rejects ("Unsupported pooling size"); it is
rewritten as the equivalent 2-D MaxPool on NCHW.

The mask-wise merge (`postprocess.postprocess`) does not convert with jax2onnx 0.17.1; run it on the outputs in JAX
(`postprocess.postprocess`) or port it. What fails, with jax 0.10.2:
- batched (`jax.vmap` of `panoptic_merge`): tracing under jax2onnx stops in jax's `select_n` batching rule
  (`_select_batch_rule`: `assert np.ndim(which) == 1`) at the index normalisation of `is_thing[category]`;
- one image (`panoptic_merge`): jax2onnx's `fori_loop` lowering (plugins/jax/lax/fori_loop.py, `_build_body_graph`)
  turns the body's closed-over values into numpy constants, and the paste loop closes over traced arrays (the slot
  order, areas, shared-pixel table): `TracerArrayConversionError`;
- with those passed through the loop carry instead, the graph is written but onnxruntime rejects it: in the body of
  the `scan` that `lax.map` over pixel blocks becomes, `jnp.where(count == 2, x / 2, 0)` (`select_n` with a weakly
  typed literal) is a Where with a float and an int32 branch (type inference error).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from panoptic_jax import ops

INPUT_NAME = "images"
OUTPUT_NAMES = ("mask_logits", "class_logits")
DEFAULT_OPSET = 21


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
  """Silences the named loggers: jax2onnx logs a traceback for each of its example plugins whose optional package
  (equinox, dm-pix) is absent, and onnx_ir a warning per intermediate value it leaves untyped."""
  loggers = [logging.getLogger(name) for name in names]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _legalize_max_pool(proto: Any) -> int:
  """Rewrites each MaxPool over `[1, 1, B, H, W, C]` with a unit window on B and C as Squeeze -> Transpose to NCHW ->
  2-D MaxPool -> Transpose -> Unsqueeze (same values); returns how many it rewrote.

  onnxruntime's MaxPool takes 1 to 3 spatial axes; jax2onnx passes NHWC `reduce_window_max` windows such as
  (1, 3, 3, 1) through as 4 spatial axes.
  """
  from onnx import TensorProto, helper

  graph = proto.graph
  nodes, count = [], 0
  for node in graph.node:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get("kernel_shape", ()))
    if node.op_type != "MaxPool" or len(kernel) != 4:
      nodes.append(node)
      continue
    strides, pads = list(attrs.get("strides", [1] * 4)), list(attrs.get("pads", [0] * 8))
    dilations = list(attrs.get("dilations", [1] * 4))
    unit = [0, 3]
    if (any(kernel[i] != 1 or strides[i] != 1 or dilations[i] != 1 or pads[i] or pads[i + 4] for i in unit)
        or attrs.get("ceil_mode", 0) or len(node.output) != 1):
      raise ValueError(f"ONNX legalization: MaxPool {node.name} has a 4-D window {kernel} (strides {strides}, pads "
                       f"{pads}) that is not a 2-D pool over NHWC; onnxruntime cannot run it")
    tag = f"{node.name}_2d"
    axes = f"{tag}_axes"
    graph.initializer.append(helper.make_tensor(axes, TensorProto.INT64, [2], [0, 1]))
    nodes += [
        helper.make_node("Squeeze", [node.input[0], axes], [f"{tag}_nhwc"]),
        helper.make_node("Transpose", [f"{tag}_nhwc"], [f"{tag}_nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("MaxPool", [f"{tag}_nchw"], [f"{tag}_pooled"], kernel_shape=kernel[1:3],
                         strides=strides[1:3], pads=pads[1:3] + pads[5:7], dilations=dilations[1:3]),
        helper.make_node("Transpose", [f"{tag}_pooled"], [f"{tag}_pooled_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Unsqueeze", [f"{tag}_pooled_nhwc", axes], [node.output[0]]),
    ]
    count += 1
  del graph.node[:]
  graph.node.extend(nodes)
  return count


def export_onnx(model: nnx.Module, image_hw: tuple[int, int], path: str, *, opset: int = DEFAULT_OPSET,
                dynamic_batch: bool = True, input_dtype: str = "float32") -> dict[str, Any]:
  """Writes `model`'s image -> (mask_logits, class_logits) network as one ONNX file (weights inside).

  Args:
    model: a KMaXDeepLab in eval mode (`model.eval()`: running statistics, no dropout or drop-path).
    image_hw: (H, W) of the input images (static in the graph; kMaX's crops are 32k + 1 per side).
    path: the .onnx file to write.
    opset: ONNX opset (21: onnxruntime 1.17+, TensorRT 10).
    dynamic_batch: the batch axis is the symbol "B" (True) or 1 (False).
    input_dtype: "float32" or "uint8", both in 0..255.

  Returns:
    dict: path, opset, inputs / outputs ({name: [dims]}, "B" for the symbolic batch), nodes (count), op_types
    ({ONNX op: count}), max_pools_legalized, seconds (conversion).
  """
  import onnx
  with _quiet("jax2onnx.plugins.plugin_system"):
    from jax2onnx import to_onnx

  if not getattr(model, "deterministic", False):
    raise ValueError("export_onnx: the model is in training mode (batch statistics, dropout); call model.eval() first")
  if input_dtype not in ("float32", "uint8"):
    raise ValueError(f"export_onnx: input_dtype must be 'float32' or 'uint8', found {input_dtype!r}")
  height, width = (int(s) for s in image_hw)
  batch = "B" if dynamic_batch else "1"
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"{batch}, {height}, {width}, 3"), jnp.dtype(input_dtype))
  graphdef, state = nnx.split(model)

  def network(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    outputs = nnx.merge(graphdef, state)(images)
    return outputs["mask_logits"], outputs["class_logits"]

  start = time.perf_counter()
  with ops.portable(), _quiet("onnx_ir", "jax2onnx"), warnings.catch_warnings():
    # jax2onnx's lowerings use APIs that flax and Python deprecate (Variable.value, int() via __trunc__).
    warnings.simplefilter("ignore", DeprecationWarning)
    proto = to_onnx(network, inputs=[spec], model_name="kmax_deeplab", opset=opset, input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES))
  legalized = _legalize_max_pool(proto)
  onnx.save(proto, path)
  onnx.checker.check_model(path)
  seconds = time.perf_counter() - start

  def dims(values) -> dict[str, list]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}

  op_types: dict[str, int] = {}
  for node in proto.graph.node:
    op_types[node.op_type] = op_types.get(node.op_type, 0) + 1
  return dict(path=path, opset=opset, inputs=dims(proto.graph.input), outputs=dims(proto.graph.output),
              nodes=len(proto.graph.node), op_types=op_types, max_pools_legalized=legalized, seconds=seconds)


def load_session(path: str, threads: int | None = None) -> Any:
  """An onnxruntime CPU session for `path` (`threads`: intra-op threads; None: onnxruntime's default)."""
  try:
    import onnxruntime as ort
  except ImportError as e:
    raise ImportError("running ONNX models needs onnxruntime: pip install -r requirements-onnx.txt") from e
  options = ort.SessionOptions()
  if threads is not None:
    options.intra_op_num_threads = threads
  return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(path_or_session: Any, images: np.ndarray) -> dict[str, np.ndarray]:
  """Runs an `export_onnx` file (or its `load_session`) on `images [B, H, W, 3]` (the exported dtype, 0..255).

  Returns {"mask_logits": [B, h, w, N], "class_logits": [B, N, K + 1]} float32 numpy arrays.
  """
  session = load_session(path_or_session) if isinstance(path_or_session, str) else path_or_session
  expected = session.get_inputs()[0]
  dtype = np.uint8 if expected.type == "tensor(uint8)" else np.float32
  images = np.asarray(images)
  if images.ndim != 4 or list(images.shape[1:]) != list(expected.shape[1:]):
    raise ValueError(f"run_onnx: the model takes images {expected.shape}, found shape {images.shape}")
  outputs = session.run(list(OUTPUT_NAMES), {expected.name: images.astype(dtype, copy=False)})
  return dict(zip(OUTPUT_NAMES, outputs))
