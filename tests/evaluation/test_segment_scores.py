"""AP from a project-format prediction's segment lists (segments/<stem>.json): scores reach the right segments through
the on-disk numbering and the category mapping; images without a list leave AP uncomputed; bad lists are errors."""

import json

import numpy as np
import pytest

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.storage import open_storage
from panoptic_jax.evaluation import evaluator as evaluator_lib

GT_INFO = fmt.DatasetInfo(("road", "car", "person"), ((128, 64, 128), (0, 0, 142), (220, 20, 60)),
                          (False, True, True))
D = GT_INFO.label_divisor


def _gt_map() -> np.ndarray:
  """int32 [32, 48]: road, 2 cars, 1 person."""
  panoptic = np.zeros((32, 48), np.int32)
  panoptic[4:12, 4:14] = 1 * D + 1
  panoptic[4:12, 20:30] = 1 * D + 2
  panoptic[16:30, 36:42] = 2 * D + 1
  return panoptic


def _write(location, info: fmt.DatasetInfo, maps: dict, lists: dict) -> None:
  """A dataset without images: maps {stem: canonical map in `info`}, segment-list bytes {stem: bytes}."""
  storage = open_storage(location)
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(info).encode())
  for stem, panoptic in maps.items():
    storage.write_bytes(f"panoptic_maps/{stem}.tif", fmt.encode_annotation(panoptic, info))
  for stem, data in lists.items():
    storage.write_bytes(f"segments/{stem}.json", data)


def _evaluate(tmp_path) -> dict:
  return evaluator_lib.evaluate_sides(evaluator_lib.open_dataset_side(str(tmp_path / "gt")),
                                      evaluator_lib.open_dataset_side(str(tmp_path / "pred")), num_workers=1,
                                      progress=False)


@pytest.fixture
def gt(tmp_path):
  _write(tmp_path / "gt", GT_INFO, {"a": _gt_map(), "b": _gt_map()}, {})


def _prediction(tmp_path, lists=None):
  """The GT as a prediction in another category order (person, road, car), its cars stored with ids 4 and 9 and the
  scores: the car with id 9 (GT car 2) higher than a false car that only id 4 (GT car 1) overlaps by half."""
  info = fmt.DatasetInfo(("person", "road", "car"), (GT_INFO.colors[2], GT_INFO.colors[0], GT_INFO.colors[1]),
                         (True, False, True))
  panoptic = _gt_map()
  pred = np.select([panoptic == 0, panoptic == D + 1, panoptic == D + 2], [1 * D, 2 * D + 4, 2 * D + 9], 1)
  pred[4:12, 4:9] = 1 * D  # The first car is half missed.
  _, segments = fmt.number_segments(pred, info, {D: 0.9, 2 * D + 4: 0.3, 2 * D + 9: 0.8, 1: 0.7})
  storage = open_storage(tmp_path / "pred")
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(info).encode())
  for stem in ("a", "b"):
    # The cars keep the ids 4 and 9 on disk, which the segment lists name; decoding ranks them 1 and 2.
    storage.write_bytes(f"panoptic_maps/{stem}.tif", fmt.encode_annotation(pred, info))
  listed = [json.loads(line.rstrip(",")) for line in fmt.encode_segments(segments).decode().splitlines()[1:-1]]
  for entry in listed:
    if entry["category"] == "car":
      entry["instance"] = {1: 4, 2: 9}[entry["instance"]]
  document = {"height": segments.height, "width": segments.width, "segments": listed}
  for stem in ("a", "b"):
    data = (lists or {}).get(stem, json.dumps(document).encode())
    if data is not None:
      storage.write_bytes(f"segments/{stem}.json", data)
  return document


def test_scores_follow_the_on_disk_numbering_and_the_category_mapping(gt, tmp_path):
  _prediction(tmp_path)
  result = _evaluate(tmp_path)["instance"]
  assert result["computed"]
  # Per image the person (0.7) and GT car 2 (id 9, 0.8) are exact; GT car 1 (id 4, 0.3) covers half of it. At IoU
  # 0.75 cars rank TP, TP, FP, FP: recall 0.5 at precision 1, AP 51/101 (the scores swapped onto the wrong cars
  # would rank the false ones first: 0.5 * 51/101); the person has AP 1.
  assert result["AP50"] == pytest.approx(1.0)
  assert result["AP75"] == pytest.approx((1 + 51 / 101) / 2)


def test_images_without_a_segment_list_leave_ap_uncomputed(gt, tmp_path):
  _prediction(tmp_path, lists={"b": None})
  result = _evaluate(tmp_path)
  assert not result["instance"]["computed"]
  assert result["instance"]["reason"] == "AP not computed: no segment scores for 1 images (b)"
  assert result["panoptic"]["All"]["n"] == 3


@pytest.mark.parametrize("mutate, message", [
    (lambda d: b"{not json", r"b.json: not valid JSON"),
    (lambda d: d["segments"][1].pop("score"), r"b.json: segments\[1\].score: expected a finite number, found None"),
    (lambda d: d["segments"][2].update(category="bus"), r"b.json: segments\[2\].category: 'bus' is not in"),
    (lambda d: d["segments"][0].update(isthing=False), r"b.json: segments\[0\].isthing: expected true"),
    (lambda d: d["segments"][1].update(instance=-1), r"b.json: segments\[1\].instance: expected an integer >= 0"),
    (lambda d: d.update(height="32"), r"b.json.height: expected an integer >= 1, found '32'"),
    (lambda d: d["segments"].pop(), r"b.json: segments: expected the 4 segments of the map .*b.tif, found 3 listed "
                                    r"\(.*\); in the map but not listed: car #2; listed but not in the map: none"),
])
def test_a_malformed_segment_list_is_an_error_naming_file_and_field(gt, tmp_path, mutate, message):
  document = _prediction(tmp_path)
  data = mutate(document)
  _prediction(tmp_path, lists={"b": data if isinstance(data, bytes) else json.dumps(document).encode()})
  with pytest.raises(evaluator_lib.EvaluationError, match=message):
    _evaluate(tmp_path)
