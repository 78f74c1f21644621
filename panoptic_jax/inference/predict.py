"""The model's forward pass and the mask-wise merge, as one pure function: images -> panoptic maps and segment scores.

The in-loop evaluation, the prediction command (`trained_model.TrainedModel.forward`) and the export share it, so
that the same image gets the same map in all three; `predictor.to_original` takes a map back to the image's size.
"""

from __future__ import annotations

import jax
from flax import nnx

from panoptic_jax.inference import postprocess

OUTPUT_KEYS = ("panoptic", "segment_category", "segment_instance", "segment_score", "segment_valid")


def predict(graph: nnx.GraphDef, params: nnx.State, model_state: nnx.State, images: jax.Array, is_thing: jax.Array,
            config: postprocess.PostprocessConfig, label_divisor: int) -> dict[str, jax.Array]:
  """Runs the model in eval mode and merges its masks at the input resolution.

  Args:
    graph: the model's graph in eval mode (`nnx.split(model)[0]` after `model.eval()`).
    params, model_state: its parameters and the rest of its state (batch statistics).
    images: `[B, H, W, 3]` uint8 or float in 0..255.
    is_thing: `[C]` bool.
    config: merge thresholds (static).
    label_divisor: of the canonical maps (static).

  Returns:
    `panoptic [B, H, W]` int32 canonical maps (VOID = -1) and per slot `segment_category`, `segment_instance`,
    `segment_score`, `segment_valid`, each `[B, N]` (see `postprocess.panoptic_merge`).
  """
  model = nnx.merge(graph, params, model_state, copy=True)
  outputs = model(images)
  merged = postprocess.postprocess(outputs["mask_logits"], outputs["class_logits"], images.shape[1:3], is_thing,
                                   config, label_divisor)
  return {k: merged[k] for k in OUTPUT_KEYS}

