"""Evaluation of the model being trained: predictions at the original resolution scored like the official tools.

The model runs jitted on padded eval crops; on the host each prediction is cut to its content, resized (nearest) to
the image's original size and compared with the original ground truth, so the numbers are those of panopticapi on
full-resolution maps, not of resized labels.
"""

import concurrent.futures
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from panoptic_jax import visualize
from panoptic_jax.data import pipeline, storage
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.evaluation.evaluator import Evaluator, format_table
from panoptic_jax.inference import postprocess, predict, predictor
from panoptic_jax.training import sharding


def _gather(tree: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows of a per-process numpy batch, concatenated in process order (the global batch order)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda x: np.concatenate(list(x)), multihost_utils.process_allgather(tree))


def jit_predict(model_def, postprocess_preset: str, is_thing, label_divisor: int):
  """The evaluation's jitted step `(train state, images uint8 [B, H, W, 3]) -> panoptic predictions` of the model
  in eval mode, with `postprocess_preset`'s merging (`is_thing` [num_classes] bool: the dataset's categories)."""
  pp_config = postprocess.get_preset(postprocess_preset)
  is_thing = np.asarray(is_thing, bool)  # A constant of the program, on no device (the plan lowers for TPU).
  return jax.jit(lambda state, images: predict.predict(
      model_def.eval_graph, state["params"], state["model_state"], images, is_thing, pp_config, label_divisor))


class ModelEvaluator:
  """Runs one pass over the validation set and returns PQ / SQ / RQ, mIoU and mask AP."""

  def __init__(self, config: ml_collections.ConfigDict, model_def, dataset: Dataset, mesh,
               pipeline_config: pipeline.PipelineConfig, pictures: storage.Storage):
    self._dataset = dataset
    self._info = dataset.info
    self._mesh = mesh
    self._pipeline_config = pipeline_config
    self._max_images = config.eval.max_images
    self._num_pictures = config.eval.num_visualizations
    self._pictures = pictures
    self._predict = jit_predict(model_def, config.eval.postprocess, self._info.is_thing, self._info.label_divisor)
    self._compiled = None  # Compiled on the first batch (shapes are fixed by the eval crop and batch size).
    self._capacities: dict[str, Any] = {}

  def evaluate(self, state: dict, step: int) -> dict[str, Any]:
    """Returns {"scalars": {...}, "table": str, "result": the full nested result}."""
    info = self._info
    # The metric's static capacities grown by earlier passes: a pass never starts below what the data needed.
    evaluator = Evaluator(info.categories, info.is_thing, info.label_divisor, shard=False, **self._capacities)
    iterator = pipeline.make_eval_iterator(self._dataset, self._pipeline_config)
    pictures = 0
    seen = 0
    # The ground truth of a batch is read and decoded in threads while the devices compute its predictions.
    readers = concurrent.futures.ThreadPoolExecutor(4, "read_ground_truth")
    try:
      for local in iterator:
        meta = _gather({k: local[k] for k in ("valid", "index", "content_hw", "original_hw")})
        wanted = np.flatnonzero(meta["valid"])
        if self._max_images:
          wanted = wanted[:max(0, self._max_images - seen)]
        ground_truths = [readers.submit(self._dataset.read_panoptic, int(meta["index"][i])) for i in wanted]
        batch = sharding.global_batch({"image": local["image"]}, self._mesh)
        if self._compiled is None:
          self._compiled = sharding.compile_together(self._predict, state, batch["image"], name=f"predict_{step}")
        # Global arrays -> numpy on every process (predictions of all processes' images).
        preds = multihost_utils.process_allgather(self._compiled(state, batch["image"]), tiled=True)
        for i, ground_truth in zip(wanted, ground_truths):
          index = int(meta["index"][i])
          prediction, scores = predictor.to_original({k: v[i] for k, v in preds.items()}, meta["content_hw"][i],
                                                     meta["original_hw"][i], info.label_divisor)
          ground_truth = ground_truth.result()
          evaluator.add(ground_truth, prediction, scores=scores, name=self._dataset.examples[index].name)
          seen += 1
          if pictures < self._num_pictures and jax.process_index() == 0:
            self._save_picture(step, index, ground_truth, prediction)
            pictures += 1
    finally:
      readers.shutdown(cancel_futures=True)
      if hasattr(iterator, "close"):
        iterator.close()
    result = evaluator.result()
    self._capacities = {"max_segments": evaluator.max_segments, "mixed_fraction": evaluator.mixed_fraction}
    table = format_table(result)
    if jax.process_index() == 0:
      logging.info("Evaluation at step %d on %d images:\n%s", step, seen, table)
      if pictures:
        logging.info("Pictures (image | ground truth | prediction): %s", self._pictures.url())
    return {"scalars": _scalars(result), "table": table, "result": result}

  def _save_picture(self, step: int, index: int, ground_truth: np.ndarray, prediction: np.ndarray) -> None:
    image = self._dataset.read_image(index)
    name = self._dataset.examples[index].name
    png = visualize.comparison(image, ground_truth, prediction, self._info)
    self._pictures.write_bytes(f"step{step:07d}_{name}.png", png)


def _scalars(result: dict) -> dict[str, float]:
  """The headline numbers (percent) for logs and TensorBoard; absent values are left out."""
  out = {}
  for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
    for metric in ("pq", "sq", "rq"):
      value = result["panoptic"][group][metric]
      if value is not None:
        out[f"{metric.upper()}{suffix}"] = 100.0 * value
  if result["semantic"]["mIoU"] is not None:
    out["mIoU"] = 100.0 * result["semantic"]["mIoU"]
  if result["instance"].get("computed"):
    out.update({k: 100.0 * result["instance"][k] for k in ("AP", "AP50", "AP75") if result["instance"][k] >= 0})
  return out
