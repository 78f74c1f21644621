"""Exports a trained model as one artifact that runs with jax and numpy alone (`serving.py`).

    ARTIFACT/
      manifest.json      format version, versions of panoptic_jax and jax, platforms, dtype, the model's spec
                         (categories, colours, things, label_divisor, input size and normalisation, merge thresholds),
                         and the inputs and outputs of the function
      model.jaxexport    `jax.export` of (weights, images uint8 [B, h, w, 3]) -> predict.predict's outputs: the network
                         and the mask-wise merge, B symbolic, lowered for each platform asked
      weights.npz        the parameters and batch statistics, one array per name (numpy's format: nothing else
                         is needed to read them)
      model.onnx         with onnx=True: the network alone, images float32 [B, h, w, 3] in 0..255 -> mask_logits
                         [B, h', w', N], class_logits [B, N, K + 1] (`onnx_export.py`; the merge does not convert)

The weights are arguments of the exported function, not constants inside it: the StableHLO stays small, and the
arrays are read with numpy. Backend kernels are chosen per platform inside the function (`ops.dispatch`), so the
CPU lowering carries the XLA:CPU convolutions and the GPU / TPU lowerings plain ones.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import panoptic_jax
from panoptic_jax.data.storage import open_storage
from panoptic_jax.inference import predict
from panoptic_jax.inference.serving import FORMAT_VERSION, MANIFEST
from panoptic_jax.inference.trained_model import TrainedModel
from panoptic_jax.training import checkpoint

FUNCTION = "model.jaxexport"
WEIGHTS = "weights.npz"
ONNX_FILE = "model.onnx"
PLATFORMS = ("cpu", "cuda", "tpu")
OUTPUTS = {
    "panoptic": "int32 [B, h, w] canonical map category * label_divisor + instance, -1 void, at the crop",
    "segment_category": "int32 [B, N] category of each mask slot's segment",
    "segment_instance": "int32 [B, N] instance number (0 for stuff)",
    "segment_score": "float32 [B, N] the merge's confidence",
    "segment_valid": "bool [B, N] whether the slot's segment was pasted into the map",
}


def _weights_tree(model: TrainedModel) -> tuple[list[str], list[jax.Array], Any]:
  """The parameters and the rest of the state as (names, arrays, treedef); names as checkpoints name them,
  "params.backbone.stem.conv.kernel"."""
  paths, treedef = jax.tree_util.tree_flatten_with_path({"params": model.params, "model_state": model.model_state})
  return [checkpoint.leaf_name(path) for path, _ in paths], [leaf for _, leaf in paths], treedef


def flat_weights(model: TrainedModel) -> dict[str, np.ndarray]:
  """name -> numpy array of the parameters ("params.<path>") and the rest of the state ("model_state.<path>")."""
  names, leaves, _ = _weights_tree(model)
  return dict(zip(names, (np.asarray(x) for x in jax.device_get(leaves))))


def exported_function(model: TrainedModel, names: Sequence[str] | None = None):
  """(weights by name, images uint8 [B, h, w, 3]) -> predict.predict's outputs (weights as `flat_weights` names).

  `names`: the weights the function takes (default all); any other is a zero constant, for weights that inference
  does not read (the auxiliary semantic head's, the dropout streams').
  """
  all_names, leaves, treedef = _weights_tree(model)
  names = set(all_names if names is None else names)
  is_thing = np.asarray(model.info.is_thing, bool)

  def fn(weights: dict[str, jax.Array], images: jax.Array) -> dict[str, jax.Array]:
    state = jax.tree_util.tree_unflatten(treedef, [weights[n] if n in names else jnp.zeros(x.shape, x.dtype)
                                                   for n, x in zip(all_names, leaves)])
    return predict.predict(model.graph, state["params"], state["model_state"], images, jnp.asarray(is_thing),
                           model.spec.postprocess, model.info.label_divisor)

  return fn


def used_weights(model: TrainedModel, weights: dict[str, np.ndarray]) -> list[str]:
  """The names of the weights that inference reads (traced once with a batch of one)."""
  h, w = model.spec.crop_size
  specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  jaxpr = jax.make_jaxpr(exported_function(model))(specs, jax.ShapeDtypeStruct((1, h, w, 3), jnp.uint8)).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
  return [name for name, var in zip(sorted(weights), jaxpr.invars) if id(var) in read]


def export(model: TrainedModel, out: str, platforms: Sequence[str] = PLATFORMS, dtype: str = "float32",
           onnx: bool = False) -> dict[str, Any]:
  """Writes ARTIFACT (see the module docstring) for `model`; returns the manifest.

  Args:
    model: loaded with the compute dtype wanted (`trained_model.load(..., dtype=)`).
    out: the artifact's folder, local or in a bucket (created; files in it are replaced).
    platforms: lowerings to include ("cpu", "cuda", "tpu").
    dtype: the compute dtype the model was loaded with (recorded in the manifest).
    onnx: also write ONNX_FILE, the network alone (images -> mask and class logits; `onnx_export.py`).
  """
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown or not platforms:
    raise ValueError(f"--platforms: expected some of {', '.join(PLATFORMS)}, found {', '.join(platforms) or 'none'}")
  weights = flat_weights(model)
  weights = {name: weights[name] for name in used_weights(model, weights)}
  weight_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()}
  (batch,) = jax.export.symbolic_shape("b")
  h, w = model.spec.crop_size
  images = jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8)
  start = time.perf_counter()
  exported = jax.export.export(jax.jit(exported_function(model, list(weights))), platforms=tuple(platforms))(
      weight_specs, images)
  seconds = time.perf_counter() - start

  artifact = open_storage(out)
  artifact.write_bytes(FUNCTION, exported.serialize())
  stored = io.BytesIO()
  np.savez(stored, **weights)
  artifact.write_bytes(WEIGHTS, stored.getvalue())
  manifest = {
      "format": "panoptic_jax export", "format_version": FORMAT_VERSION,
      "panoptic_jax_version": panoptic_jax.__version__, "jax_version": jax.__version__,
      "serialization_version": exported.calling_convention_version,
      "platforms": list(exported.platforms), "dtype": dtype,
      "source": {"workdir": model.workdir, "step": model.step, "preset": model.config.model.preset},
      "spec": model.spec.to_json(),
      "function": {"file": FUNCTION, "inputs": {"weights": f"{WEIGHTS}: one array per name",
                                                 "images": f"uint8 [B, {h}, {w}, 3], B any"},
                   "outputs": OUTPUTS},
      "weights": {"file": WEIGHTS, "arrays": len(weights), "parameters": int(sum(v.size for v in weights.values()))},
      "export_seconds": round(seconds, 2),
  }
  if onnx:
    from panoptic_jax.inference import onnx_export  # Needs requirements-onnx.txt.
    with tempfile.TemporaryDirectory() as staging:  # The ONNX library writes files; the artifact may be in a bucket.
      local = os.path.join(staging, ONNX_FILE)
      manifest["onnx"] = {**onnx_export.export_onnx(model.model(), model.spec.crop_size, local),
                          "path": artifact.url(ONNX_FILE)}
      with open(local, "rb") as f:
        artifact.write_bytes(ONNX_FILE, f.read())
  artifact.write_bytes(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
  return manifest
