"""Pictures of panoptic maps: category colours with per-instance shading, boundaries, and image | GT | prediction."""

import io

import numpy as np
from PIL import Image

from panoptic_jax.data.dataset_format import VOID, DatasetInfo


def colorize(panoptic: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """int32 [H, W] canonical map -> uint8 [H, W, 3]: category colour, thing instances shaded apart, void black."""
  palette = np.array([c if c is not None else (128, 128, 128) for c in info.colors], np.float32)
  void = panoptic == VOID
  category = np.where(void, 0, panoptic // info.label_divisor)
  instance = np.where(void, 0, panoptic % info.label_divisor)
  # Alternate instances of one class between lighter and darker shades so that touching instances separate.
  shade = np.where(instance > 0, 0.65 + 0.35 * ((instance * 0.618034) % 1.0), 1.0)
  rgb = palette[category] * shade[..., None]
  rgb[_boundaries(panoptic)] = 255.0
  rgb[void] = 0.0
  return rgb.astype(np.uint8)


def _boundaries(panoptic: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels whose right or lower neighbour belongs to another segment."""
  edge = np.zeros(panoptic.shape, bool)
  edge[:, :-1] |= panoptic[:, :-1] != panoptic[:, 1:]
  edge[:-1, :] |= panoptic[:-1, :] != panoptic[1:, :]
  return edge


def overlay(image: np.ndarray, panoptic: np.ndarray, info: DatasetInfo, alpha: float = 0.55) -> np.ndarray:
  """Blends the colourised map over the image (void pixels show the image)."""
  colors = colorize(panoptic, info).astype(np.float32)
  blend = np.where((panoptic == VOID)[..., None], image, (1 - alpha) * image + alpha * colors)
  return blend.astype(np.uint8)


def comparison(image: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray, info: DatasetInfo) -> bytes:
  """PNG bytes of image | ground truth | prediction side by side (maps at the image's size)."""
  gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
  row = np.concatenate([image, gap, overlay(image, ground_truth, info), gap, overlay(image, prediction, info)], 1)
  buffer = io.BytesIO()
  Image.fromarray(row).save(buffer, format="PNG")
  return buffer.getvalue()
