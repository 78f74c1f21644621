"""The authors' PyTorch port's checkpoints map completely onto our presets, checked without the port: the state-dict
keys and shapes of models built from its configs (R50 and ConvNeXt-B COCO, R50 Cityscapes) (names and shapes only, `port_inventory/`; how they were made:
BENCHMARKS.md, "Weights from the kMaX PyTorch port") stand in for its files. Forward equality with the port itself
is measured by bench/port_equivalence.py."""

import collections
import json
import pathlib

import numpy as np
import pytest

from panoptic_jax.model import kmax_deeplab
from panoptic_jax.weights import importer, kmax_port

INVENTORY = pathlib.Path(__file__).parent / "port_inventory"


def _file(name: str) -> dict[str, np.ndarray]:
  """A stand-in for the port's state dict: zeros of each key's shape (no memory is written until converted)."""
  return {key: np.zeros(shape, np.float32) for key, shape in json.loads((INVENTORY / f"{name}.json").read_text())}


def _plan(preset: str, tensors: dict[str, np.ndarray], class_names=kmax_port.COCO_PANOPTIC):
  targets = importer.variables(importer.model_variables(kmax_deeplab.abstract_model(preset, len(class_names))))
  return importer.plan(tensors, targets, kmax_deeplab.get_config(preset), len(class_names), source=f"{preset}.pth",
                       class_names=class_names)


@pytest.mark.parametrize("preset", ["kmax_r50_coco", "kmax_convnext_b_coco"])
def test_every_key_is_used_once_and_every_parameter_filled(preset):
  tensors = _file(preset)
  values, report = _plan(preset, tensors)
  assert report.scheme == "kmax_port"
  uses = collections.Counter(source for sources in report.loaded.values() for source in sources)
  assert max(uses.values()) == 1
  assert set(uses) | set(report.unused_expected) == set(tensors)
  assert all(name.endswith("num_batches_tracked") for name in report.unused_expected)
  assert not report.left_at_init and report.parameters_loaded == report.parameters_total
  # The parameter counts of the port (its README / reference): 72,436,862 for R50 COCO with the auxiliary head.
  if preset == "kmax_r50_coco":
    assert report.parameters_total == 72_436_862
  assert report.classes == {"file": 133, "model": 133, "kept": 133, "reordered": False, "new": [], "dropped": []}
  # Layout conversions: a Conv1d [O, I, 1] becomes our dense [I, O]; the cluster centres [C, N] become [N, C].
  assert values["transformer_decoder.layers.0.qkv.conv.kernel"].array.shape == (256, 512)
  assert values["transformer_decoder.cluster_centers"].array.shape == (128, 256)


def test_a_fine_tuning_label_space_keeps_the_categories_it_shares_by_name():
  driving = ("car", "person", "lane marking", "bicycle", "traffic light", "pothole")
  values, report = _plan("kmax_r50_coco", _file("kmax_r50_coco"), class_names=driving)
  coco = kmax_port.COCO_PANOPTIC
  rows = values["transformer_decoder.predictor.class_head.kernel"].rows
  assert list(rows) == [coco.index("car"), coco.index("person"), -1, coco.index("bicycle"),
                        coco.index("traffic light"), -1, len(coco)]
  assert report.classes["new"] == ["lane marking", "pothole"] and report.classes["reordered"]
  assert report.parameters_loaded < report.parameters_total


def test_a_file_for_another_preset_is_one_error_naming_the_first_tensor_and_both_shapes():
  with pytest.raises(importer.WeightsImportError) as error:
    _plan("kmax_convnext_t_coco", _file("kmax_convnext_b_coco"))
  message = str(error.value)
  assert "backbone.downsample_layers.0.0.weight (128, 3, 4, 4)" in message, message
  assert "backbone.stages.0.down_conv.kernel (4, 4, 3, 96)" in message, message


def test_the_ports_cityscapes_model_fits_its_own_preset_and_is_refused_by_deeplab2s():
  """The port's Cityscapes pixel decoder reads the ResNet stem after max-pooling (64 channels at stride 4) as its
  fourth feature and res2 as its fifth (output stride 4): preset kmax_r50_cityscapes_port. Our kmax_r50_cityscapes
  follows DeepLab2 (res2, then the stem before pooling: output stride 2), so there the file is refused at the first
  tensor that differs rather than loaded into the wrong places."""
  tensors = _file("kmax_r50_cityscapes")
  _, report = _plan("kmax_r50_cityscapes_port", tensors, class_names=kmax_port.CITYSCAPES)
  assert not report.left_at_init and report.classes["kept"] == 19
  # Everything but the void row of the auxiliary semantic classifier, which the port's head does not have (256 + 1).
  assert report.parameters_loaded == report.parameters_total - 257 == 56_975_757
  with pytest.raises(importer.WeightsImportError, match=r"_in_norms\.3\.weight \(64,\) does not fit "
                                                        r"pixel_decoder\.in_norms\.3\.scale \(256,\)"):
    _plan("kmax_r50_cityscapes", tensors, class_names=kmax_port.CITYSCAPES)
