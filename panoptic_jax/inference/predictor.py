"""Images in, panoptic maps out: the host side of prediction around any network that runs the model and its merge.

    predictor = Predictor.from_workdir("runs/demo")         # or Predictor.from_export("exports/demo")
    result = predictor(image)                                # uint8 [H, W, 3] -> PanopticResult at [H, W]
    result.panoptic, result.segments, result.semantic(), result.instance_masks(), result.overlay(image)

Each image is resized to fit the model's crop (long side to the crop, aspect kept) and padded, exactly as the
evaluation during training prepares it (`resampling.resize_and_pad`); the network returns the merged map at the crop
and the per-slot segment scores; the map is cut to the image's extent and resized (nearest) to the image's own size
(`to_original`, which the evaluation during training uses too), so the same image gets the same map everywhere.

This module needs numpy and Pillow only (and jax through the network it is given): the serving path, which runs an
exported artifact without flax, uses it as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.resampling import resize_and_pad
from panoptic_jax.inference.spec import ModelSpec

# A network: uint8 [B, h, w, 3] crops -> {"panoptic": int32 [B, h, w], "segment_category" / "segment_instance" /
# "segment_score" / "segment_valid": [B, N]} (inference/predict.py's outputs), as numpy or jax arrays.
Network = Callable[[np.ndarray], dict]


@dataclasses.dataclass(frozen=True)
class Segment:
  """One segment of a predicted map: its canonical value `category * label_divisor + instance`, its category (index
  and name), instance number (0 for stuff), score (the merge's confidence) and area in pixels of the output map."""

  id: int
  category: int
  name: str
  instance: int
  isthing: bool
  score: float
  area: int


@dataclasses.dataclass(frozen=True)
class PanopticResult:
  """A prediction at the image's own resolution.

  Attributes:
    panoptic: int32 [H, W] canonical map `category * label_divisor + instance`, -1 void.
    segments: the segments present in the map, in increasing id.
    info: the label space (categories, colours, things, label divisor).
  """

  panoptic: np.ndarray
  segments: tuple[Segment, ...]
  info: fmt.DatasetInfo

  @property
  def scores(self) -> dict[int, float]:
    """Canonical value -> score (what the evaluator's AP ranks segments by)."""
    return {s.id: s.score for s in self.segments}

  def semantic(self) -> np.ndarray:
    """int32 [H, W] category per pixel, -1 void."""
    return np.where(self.panoptic >= 0, self.panoptic // self.info.label_divisor, -1).astype(np.int32)

  def instance_masks(self) -> tuple[np.ndarray, list[Segment]]:
    """bool [K, H, W] masks of the K thing segments and those segments (same order)."""
    things = [s for s in self.segments if s.isthing]
    masks = np.stack([self.panoptic == s.id for s in things]) if things else np.zeros((0, *self.panoptic.shape), bool)
    return masks, things

  def overlay(self, image: np.ndarray) -> np.ndarray:
    """uint8 [H, W', 3]: the image with its segments blended in, their outlines and a legend (visualize.py)."""
    from panoptic_jax import visualize  # Pillow drawing, only when asked.
    return visualize.labelled_overlay(image, self.panoptic, self.info)


def to_original(prediction: dict, content_hw: Sequence[int], original_hw: Sequence[int], label_divisor: int
                ) -> tuple[np.ndarray, dict[int, float]]:
  """One image's network outputs at the crop -> (int32 [H, W] map at the image's size, canonical value -> score).

  Args:
    prediction: one image's outputs as numpy arrays (`panoptic [h, w]`, per slot `[N]` entries).
    content_hw: the image's extent inside the padded crop.
    original_hw: the image's own size (H, W).
    label_divisor: of the map.
  """
  ch, cw = (int(v) for v in content_hw)
  panoptic = fmt.resize_nearest(np.asarray(prediction["panoptic"])[:ch, :cw], tuple(int(v) for v in original_hw))
  valid = np.asarray(prediction["segment_valid"], bool)
  values = (np.asarray(prediction["segment_category"])[valid] * label_divisor
            + np.asarray(prediction["segment_instance"])[valid])
  return panoptic, dict(zip(values.tolist(), np.asarray(prediction["segment_score"])[valid].tolist()))


def make_result(panoptic: np.ndarray, scores: dict[int, float], info: fmt.DatasetInfo) -> PanopticResult:
  """The segments present in `panoptic` (a segment of the merge can vanish in the resize to a smaller image)."""
  values, areas = np.unique(panoptic[panoptic >= 0], return_counts=True)
  segments = []
  for value, area in zip(values.tolist(), areas.tolist()):
    category, instance = divmod(value, info.label_divisor)
    segments.append(Segment(value, category, info.categories[category], instance, bool(info.is_thing[category]),
                            float(scores.get(value, 0.0)), int(area)))
  return PanopticResult(panoptic, tuple(segments), info)


class Predictor:
  """Runs a network on images of any size, in fixed-size batches, and returns maps at each image's own size.

  Args:
    network: see `Network`; called with batches of exactly `batch_size` crops (short batches are padded).
    spec: the model's categories, inference size and merge thresholds.
    batch_size: images per network call.
  """

  def __init__(self, network: Network, spec: ModelSpec, batch_size: int = 1, description: str = "model"):
    self.network = network
    self.spec = spec
    self.batch_size = batch_size
    self.description = description

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None, batch_size: int | None = None,
                   crop_size: tuple[int, int] | None = None) -> "Predictor":
    """The newest checkpoint (or `step`) of a training workdir, at the run's inference size or `crop_size`; the batch
    is split over the local devices (`batch_size` is rounded up to a multiple of their count; default one image per
    device)."""
    from panoptic_jax.inference import trained_model  # Flax and the model code: only on this path.
    model = trained_model.load(workdir, step, crop_size=crop_size)
    devices = model.mesh.size
    batch_size = -(-(batch_size or devices) // devices) * devices
    return cls(model.forward(), model.spec, batch_size, f"{workdir} at step {model.step}")

  @classmethod
  def from_export(cls, artifact: str, batch_size: int = 1) -> "Predictor":
    """An artifact written by `python -m panoptic_jax.export`, run with jax and numpy only (serving.py)."""
    from panoptic_jax.inference import serving
    loaded = serving.load(artifact)
    return cls(loaded.network, loaded.spec, batch_size, f"export {artifact}")

  @property
  def info(self) -> fmt.DatasetInfo:
    return self.spec.info

  def prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H, W, 3] -> (uint8 [h, w, 3] crop, the image's extent inside it)."""
    crop, _, content_hw = resize_and_pad(image, None, self.spec.crop_size, self.spec.resize_to_crop,
                                         self.spec.pad_value)
    return crop, content_hw

  def dispatch(self, crops: Sequence[np.ndarray]) -> tuple[dict, int]:
    """Starts the network on up to `batch_size` prepared crops and returns without waiting for it (JAX dispatches
    asynchronously): the host can prepare the next batch meanwhile. `collect` gives the outputs."""
    if not 0 < len(crops) <= self.batch_size:
      raise ValueError(f"expected 1 to {self.batch_size} crops, found {len(crops)}")
    batch = np.stack(list(crops) + [np.full_like(crops[0], self.spec.pad_value)] * (self.batch_size - len(crops)))
    return self.network(batch), len(crops)

  @staticmethod
  def collect(handle: tuple[dict, int]) -> list[dict[str, np.ndarray]]:
    """The outputs of a `dispatch`, one numpy dict per crop."""
    outputs, count = handle
    outputs = {k: np.asarray(v) for k, v in outputs.items()}
    return [{k: v[i] for k, v in outputs.items()} for i in range(count)]

  def run(self, crops: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Network outputs of up to `batch_size` prepared crops, one numpy dict per crop."""
    return self.collect(self.dispatch(crops))

  def finish(self, outputs: dict[str, np.ndarray], content_hw: Sequence[int], original_hw: Sequence[int]
             ) -> PanopticResult:
    """One crop's network outputs -> the result at the image's own size."""
    panoptic, scores = to_original(outputs, content_hw, original_hw, self.info.label_divisor)
    return make_result(panoptic, scores, self.info)

  def predict_batch(self, images: Sequence[np.ndarray]) -> list[PanopticResult]:
    """uint8 [H_i, W_i, 3] images (any sizes, any count) -> their results, in order."""
    results = []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start:start + self.batch_size]
      prepared = [self.prepare(np.asarray(image)) for image in chunk]
      outputs = self.run([crop for crop, _ in prepared])
      results += [self.finish(o, hw, image.shape[:2]) for o, (_, hw), image in zip(outputs, prepared, chunk)]
    return results

  def __call__(self, image: np.ndarray) -> PanopticResult:
    """uint8 [H, W, 3] (RGB; grayscale [H, W] is replicated) -> PanopticResult at [H, W]."""
    image = np.asarray(image)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
      raise ValueError(f"expected a uint8 RGB image [H, W, 3], found {image.dtype} {image.shape}")
    return self.predict_batch([image])[0]
