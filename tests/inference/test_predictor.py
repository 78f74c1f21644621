"""Predictor around a stand-in network: images of any size in, maps at each image's size out, and the result's
helpers (semantic map, instance masks, overlay)."""

import numpy as np
import pytest

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.inference.postprocess import get_preset
from panoptic_jax.inference.predictor import Predictor
from panoptic_jax.inference.spec import ModelSpec

INFO = fmt.DatasetInfo(("road", "car", "person"), ((128, 64, 128), (0, 0, 142), (220, 20, 60)), (False, True, True))
CROP = (33, 65)


class HalfRoadHalfCars:
  """A network whose map is road on the crop's top half and, below, car 1 left and car 2 right of the middle;
  it records the batches it is given."""

  def __init__(self):
    self.batches = []

  def __call__(self, crops: np.ndarray) -> dict:
    self.batches.append(crops)
    b, h, w, _ = crops.shape
    panoptic = np.zeros((b, h, w), np.int32)  # Road (stuff): category 0, instance 0.
    panoptic[:, h // 2:, :w // 2] = 1001
    panoptic[:, h // 2:, w // 2:] = 1002
    return {"panoptic": panoptic, "segment_category": np.tile([0, 1, 1, 2], (b, 1)),
            "segment_instance": np.tile([0, 1, 2, 1], (b, 1)), "segment_score": np.tile([0.9, 0.8, 0.7, 0.6], (b, 1)),
            "segment_valid": np.tile([True, True, True, False], (b, 1))}


def _predictor(batch_size: int = 2) -> tuple[Predictor, HalfRoadHalfCars]:
  network = HalfRoadHalfCars()
  return Predictor(network, ModelSpec(INFO, CROP, True, get_preset("coco")), batch_size), network


def test_maps_come_back_at_each_images_own_size_with_the_segments_present():
  predictor, network = _predictor()
  images = [np.zeros((16, 32, 3), np.uint8), np.zeros((40, 40, 3), np.uint8), np.zeros((7, 100, 3), np.uint8)]
  results = predictor.predict_batch(images)
  assert [r.panoptic.shape for r in results] == [(16, 32), (40, 40), (7, 100)]
  assert [b.shape for b in network.batches] == [(2, *CROP, 3), (2, *CROP, 3)]  # The short batch is padded.
  wide = results[0]
  # 16x32 fits the 33x65 crop at scale 2: its content is 32x64, so the split lies at its own half.
  assert (wide.panoptic[:8] == 0).all() and (wide.panoptic[8:, :16] == 1001).all()
  assert [(s.name, s.instance, s.score) for s in wide.segments] == [("road", 0, 0.9), ("car", 1, 0.8),
                                                                    ("car", 2, 0.7)]
  assert sum(s.area for s in wide.segments) == 16 * 32
  assert wide.scores == {0: 0.9, 1001: 0.8, 1002: 0.7}  # The invalid slot (a person) is not a segment.


def test_semantic_map_instance_masks_and_overlay():
  predictor, _ = _predictor(batch_size=1)
  image = np.full((16, 32, 3), 200, np.uint8)
  result = predictor(image)
  semantic = result.semantic()
  assert semantic.dtype == np.int32 and set(np.unique(semantic)) == {0, 1}
  masks, things = result.instance_masks()
  assert masks.shape == (2, 16, 32) and [s.id for s in things] == [1001, 1002]
  assert not (masks[0] & masks[1]).any() and (masks.sum(0) == (semantic == 1)).all()
  picture = result.overlay(image)
  assert picture.dtype == np.uint8 and picture.shape[0] >= 16 and picture.shape[1] > 32  # A legend beside it.


def test_a_grayscale_image_is_accepted_and_other_arrays_are_refused():
  predictor, _ = _predictor(batch_size=1)
  assert predictor(np.zeros((16, 32), np.uint8)).panoptic.shape == (16, 32)
  with pytest.raises(ValueError, match="uint8 RGB"):
    predictor(np.zeros((16, 32, 3), np.float32))
