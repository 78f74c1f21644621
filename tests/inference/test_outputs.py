"""The prediction command's outputs: OUT is a valid dataset that decodes to the written maps and scores itself (PQ and
AP, in the project's format and as COCO panoptic), resumes, refuses another model's OUT, and draws legible overlays."""

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from panoptic_jax import visualize
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import validate as validate_lib
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.storage import open_storage
from panoptic_jax.evaluation import evaluator as evaluator_lib
from panoptic_jax.inference import outputs

INFO = fmt.DatasetInfo(("road", "sky", "car", "person"), ((128, 64, 128), (70, 130, 180), (0, 0, 142), (220, 20, 60)),
                       (False, False, True, True))
D = INFO.label_divisor
ROAD, SKY, CAR, PERSON = 0, D, 2 * D, 3 * D
HW = (48, 64)


def _gt_map(seed: int) -> np.ndarray:
  """int32 [48, 64]: sky above road, seed + 1 cars and 2 people (canonical numbering), a void corner."""
  panoptic = np.full(HW, ROAD, np.int32)
  panoptic[:12] = SKY
  for k in range(seed + 1):
    panoptic[16:28, 4 + 14 * k:14 + 14 * k] = CAR + k + 1
  panoptic[30:46, 40:46] = PERSON + 1
  panoptic[30:46, 50:56] = PERSON + 2
  panoptic[:3, :3] = fmt.VOID
  return panoptic


def _image(seed: int, hw=HW) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.fixture
def gt(tmp_path):
  """A GT dataset of 3 images (PNG) with its maps: (location, {stem: map})."""
  storage = open_storage(tmp_path / "gt")
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(INFO).encode())
  maps = {}
  for seed, stem in enumerate(["a", "b", "c"]):
    maps[stem] = _gt_map(seed)
    storage.write_bytes(f"images/{stem}.png", fmt.encode_image(_image(seed), ".png"))
    storage.write_bytes(f"panoptic_maps/{stem}.tif", fmt.encode_annotation(maps[stem], INFO))
  return tmp_path / "gt", maps


def _sparse(panoptic: np.ndarray) -> np.ndarray:
  """The same segments with thing instances numbered 3, 7, 11, ... (as after a resize that dropped segments)."""
  instance = panoptic % D
  return np.where((panoptic >= CAR) & (instance > 0), panoptic - instance + 4 * instance - 1, panoptic)


def _scores(panoptic: np.ndarray, seed: int = 0) -> dict[int, float]:
  values = [int(v) for v in np.unique(panoptic) if v != fmt.VOID]
  return dict(zip(values, np.random.default_rng(seed).uniform(0.2, 1.0, len(values)).tolist()))


def _write(out, gt, predictions: dict, **options) -> dict:
  """Writes predictions {stem: (map, scores)} for the GT's images; returns the writer's summary."""
  location, _ = gt
  writer = outputs.PredictionWriter(out, INFO, **options)
  source = open_storage(location)
  for stem, (panoptic, scores) in predictions.items():
    writer.write(stem, fmt.decode_image(source.read_bytes(f"images/{stem}.png")), panoptic, scores,
                 source=(source, f"images/{stem}.png"))
  return writer.close()


def _evaluate(gt_location, pred_side) -> dict:
  return evaluator_lib.evaluate_sides(evaluator_lib.open_dataset_side(str(gt_location)), pred_side, num_workers=1,
                                      progress=False)


def test_outputs_are_a_dataset_that_scores_itself_in_both_formats(gt, tmp_path):
  location, maps = gt
  out = tmp_path / "out"
  predictions = {stem: (_sparse(m), _scores(_sparse(m))) for stem, m in maps.items()}
  summary = _write(out, gt, predictions, coco=True, overlays=True)
  assert summary["written"] == 3 and summary["complete"] == 3 and summary["coco_images"] == 3

  report = validate_lib.validate_dataset(str(out), workers=1, progress=False)
  assert report["valid"], report["errors"]
  assert report["annotated_images"] == 3 and report["unpaired_images"]["count"] == 0
  assert os.path.islink(out / "images" / "a.png")
  assert os.path.realpath(out / "images" / "a.png") == os.path.realpath(location / "images" / "a.png")

  dataset = Dataset.open(out, require_images=False)
  assert dataset.info == INFO
  for i, stem in enumerate(dataset.names):
    np.testing.assert_array_equal(dataset.read_panoptic(i), maps[stem])  # Instances renumbered 1..K on disk.

  listed = fmt.decode_segments((out / "segments" / "a.json").read_bytes(), INFO)
  assert (listed.height, listed.width) == HW
  cars = [s for s in listed.segments if s.category == "car"]
  assert [(s.instance, s.area, s.bbox) for s in cars] == [(1, 120, (4, 16, 10, 12))]
  assert cars[0].score == predictions["a"][1][CAR + 3]  # The score of the segment written as instance 3.

  result = _evaluate(location, evaluator_lib.open_dataset_side(str(out)))
  assert result["panoptic"]["All"]["pq"] == pytest.approx(1.0)
  assert result["instance"]["computed"] and result["instance"]["AP"] == pytest.approx(1.0)

  coco = json.loads((out / "coco" / "panoptic.json").read_text())
  assert [c["name"] for c in coco["categories"]] == list(INFO.categories)
  assert coco["categories"][2] == {"id": 3, "name": "car", "isthing": 1, "color": [0, 0, 142]}
  assert [(i["id"], i["file_name"], i["height"], i["width"]) for i in coco["images"]][0] == ("a", "a.png", 48, 64)
  segment = coco["annotations"][0]["segments_info"][2]
  assert segment == {"id": 3, "category_id": 3, "iscrowd": 0, "area": 120, "bbox": [4, 16, 10, 12],
                     "score": cars[0].score}
  coco_result = _evaluate(location, evaluator_lib.open_coco_side(str(out / "coco" / "panoptic.json"), None))
  assert coco_result["panoptic"] == result["panoptic"] and coco_result["instance"] == result["instance"]


def test_imperfect_predictions_score_the_same_in_both_formats(gt, tmp_path):
  location, maps = gt
  predictions = {}
  for seed, (stem, gt_map) in enumerate(maps.items()):
    panoptic = gt_map.copy()
    panoptic[16:28, 4:9] = ROAD  # Half of the first car is missed.
    panoptic[36:40, 20:30] = PERSON + 5  # A false person on the road.
    panoptic[30:46, 50:56] = CAR + 9  # A person taken for a car.
    predictions[stem] = (panoptic, _scores(panoptic, seed))
  _write(tmp_path / "out", gt, predictions, coco=True)
  result = _evaluate(location, evaluator_lib.open_dataset_side(str(tmp_path / "out")))
  coco_result = _evaluate(location, evaluator_lib.open_coco_side(str(tmp_path / "out" / "coco" / "panoptic.json"),
                                                                None))
  assert 0 < result["panoptic"]["All"]["pq"] < 1 and 0 < result["instance"]["AP"] < 1
  assert coco_result["panoptic"] == result["panoptic"] and coco_result["instance"] == result["instance"]


def test_resume_skips_finished_images_and_keeps_their_coco_annotations(gt, tmp_path):
  _, maps = gt
  out = tmp_path / "out"
  _write(out, gt, {stem: (m, _scores(m)) for stem, m in maps.items() if stem != "c"}, coco=True, overlays=True)
  (out / "overlays" / "b.png").unlink()

  writer = outputs.PredictionWriter(out, INFO, coco=True, overlays=True)
  assert [writer.done(s) for s in ("a", "b", "c")] == [True, False, False]
  assert outputs.PredictionWriter(out, INFO, coco=True).done("b")  # Without overlays, b is complete.
  writer.write("c", _image(2), maps["c"], _scores(maps["c"]))  # No source file: the image is written as PNG.
  assert writer.done("c") and not os.path.islink(out / "images" / "c.png")
  summary = writer.close()
  assert (summary["written"], summary["complete"], summary["coco_images"]) == (1, 2, 3)
  coco = json.loads((out / "coco" / "panoptic.json").read_text())
  assert [a["image_id"] for a in coco["annotations"]] == ["a", "b", "c"]  # a and b from their segment lists.
  assert all(len(a["segments_info"]) == 5 + k for k, a in enumerate(coco["annotations"]))


def test_another_models_outputs_are_refused(gt, tmp_path):
  _, maps = gt
  out = tmp_path / "out"
  _write(out, gt, {"a": (maps["a"], _scores(maps["a"]))})
  other = fmt.DatasetInfo(("road", "sky", "car", "bus"), INFO.colors, INFO.is_thing)
  with pytest.raises(outputs.OutputError, match=rf"^{out}/metadata.yaml: OUT holds outputs for other categories .*"
                                                r"\(categories differ; only in OUT: \['person'\], only in the model: "
                                                r"\['bus'\]\): a different model's outputs"):
    outputs.PredictionWriter(out, other)
  with pytest.raises(outputs.OutputError, match=r"\(colors differ\)"):
    outputs.PredictionWriter(out, dataclasses.replace(INFO, colors=INFO.colors[::-1]))


def test_scores_are_required_and_vanished_segments_counted(gt, tmp_path):
  _, maps = gt
  writer = outputs.PredictionWriter(tmp_path / "out", INFO)
  scores = _scores(maps["a"])
  with pytest.raises(ValueError, match=rf"a: segments \[{PERSON + 2}\] of the map have no score"):
    writer.write("a", _image(0), maps["a"], {v: s for v, s in scores.items() if v != PERSON + 2})
  writer.write("a", _image(0), maps["a"], {**scores, CAR + 5: 0.5})  # A segment that vanished in a resize.
  assert writer.close()["vanished_segments"] == 1


def test_coco_categories_give_category_and_image_ids(gt, tmp_path):
  _, maps = gt
  reference = {"categories": [{"id": 7, "name": "sky", "isthing": 0}, {"id": 21, "name": "person", "isthing": 1},
                              {"id": 9, "name": "road", "isthing": 0}, {"id": 3, "name": "car", "isthing": 1},
                              {"id": 50, "name": "tree", "isthing": 0}],
               "images": [{"id": 139, "file_name": "a.jpg"}]}
  (tmp_path / "ref.json").write_text(json.dumps(reference))
  _write(tmp_path / "out", gt, {"a": (maps["a"], _scores(maps["a"]))}, coco=True,
         coco_categories=tmp_path / "ref.json")
  coco = json.loads((tmp_path / "out" / "coco" / "panoptic.json").read_text())
  assert [(c["id"], c["name"]) for c in coco["categories"]] == [(9, "road"), (7, "sky"), (3, "car"), (21, "person")]
  assert coco["images"][0]["id"] == coco["annotations"][0]["image_id"] == 139
  assert [s["category_id"] for s in coco["annotations"][0]["segments_info"]] == [9, 7, 3, 21, 21]

  del reference["categories"][1]
  (tmp_path / "ref.json").write_text(json.dumps(reference))
  with pytest.raises(outputs.OutputError, match=r"ref.json: categories: the model's categories \['person'\]"):
    outputs.PredictionWriter(tmp_path / "out2", INFO, coco=True, coco_categories=tmp_path / "ref.json")


@pytest.mark.parametrize("hw", [(16, 20), (600, 800)])
def test_overlay_shows_the_image_and_a_legend_of_the_categories_present(tmp_path, hw):
  panoptic = np.full(hw, ROAD, np.int32)
  panoptic[hw[0] // 4:hw[0] // 2, hw[1] // 4:hw[1] // 2] = CAR + 1
  panoptic[hw[0] // 2:, :hw[1] // 4] = CAR + 2
  writer = outputs.PredictionWriter(tmp_path / "out", INFO, overlays=True)
  writer.write("x", _image(0, hw), panoptic, _scores(panoptic))
  picture = np.asarray(Image.open(tmp_path / "out" / "overlays" / "x.png").convert("RGB"))
  assert picture.shape[0] >= hw[0] and picture.shape[1] > hw[1]
  # The image keeps its size at the top left; the legend at its right has a swatch (inside a black outline) for each
  # category present, at the font size, which grows with the image.
  np.testing.assert_array_equal(picture[:hw[0], :hw[1]], visualize.labelled_overlay(_image(0, hw), panoptic, INFO)[
      :hw[0], :hw[1]])
  legend = picture[:, hw[1]:].reshape(-1, 3)
  size = visualize.legend_font_size(hw[0])
  assert size == (12 if hw[0] < 480 else 15)
  for name, colour in zip(INFO.categories, INFO.colors):
    count = int(np.all(legend == colour, axis=1).sum())
    assert count == ((size - 2) ** 2 if name in ("road", "car") else 0), name


def test_outputs_on_s3_copy_the_images_and_score_themselves(gt, s3_root):
  location, maps = gt
  out = f"s3://{s3_root}/out"
  summary = _write(out, gt, {stem: (m, _scores(m)) for stem, m in maps.items()}, coco=True)
  assert summary["complete"] == 3 and summary["coco_images"] == 3
  storage = open_storage(out)
  assert storage.read_bytes("images/a.png") == (location / "images" / "a.png").read_bytes()
  assert outputs.PredictionWriter(out, INFO, coco=True).done("c")
  result = _evaluate(location, evaluator_lib.open_dataset_side(out))
  assert result["panoptic"]["All"]["pq"] == pytest.approx(1.0) and result["instance"]["AP"] == pytest.approx(1.0)


def test_the_writer_imports_no_jax_or_training_code():
  code = ("import sys, panoptic_jax.inference.outputs; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'flax', 'optax', 'orbax', 'grain'}), "
          "sorted(m for m in sys.modules if m.startswith(('panoptic_jax.model', 'panoptic_jax.training'))))")
  printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=pathlib.Path(__file__).resolve().parents[2]).stdout
  assert printed.strip() == "[] []"


def test_writes_from_a_thread_pool(gt, tmp_path):
  location, maps = gt
  writer = outputs.PredictionWriter(tmp_path / "out", INFO, coco=True, overlays=True)
  source = open_storage(location)
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    list(pool.map(lambda stem: writer.write(stem, _image(ord(stem)), maps[stem], _scores(maps[stem]),
                                            (source, f"images/{stem}.png")), sorted(maps)))
  assert all(writer.done(stem) for stem in maps)
  assert writer.close()["coco_images"] == 3
  assert validate_lib.validate_dataset(str(tmp_path / "out"), workers=1, progress=False)["valid"]
