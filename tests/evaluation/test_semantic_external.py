"""`python -m panoptic_jax.evaluate` on a semantic-only external set: exact IoUs counted by hand, the class map,
ignored categories, JSON, pictures and the errors (panoptic_jax/evaluation/semantic_external.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from panoptic_jax import evaluate
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.evaluation import semantic_external
from panoptic_jax.inference.outputs import PredictionWriter

# The external set: its own class list with Cityscapes colours. "parking" maps onto our road (many-to-one),
# "rail track" onto nothing.
THEIRS = {"R": ("road", (128, 64, 128)), "W": ("sidewalk", (244, 35, 232)), "P": ("parking", (250, 170, 160)),
          "C": ("car", (0, 0, 142)), "S": ("sky", (70, 130, 180)), "T": ("rail track", (230, 150, 140))}
# Ours (the predictions): "person" has no counterpart in the external set.
OURS = fmt.DatasetInfo(("road", "sidewalk", "car", "person", "sky"),
                       ((128, 64, 128), (244, 35, 232), (0, 0, 142), (220, 20, 60), (70, 130, 180)),
                       (False, False, True, True, False))
OUR_CODES = {"r": 0, "w": 1, "c": 2, "p": 3, "s": 4}
CLASS_MAP = "road: road\nparking: road\nsidewalk: sidewalk\ncar: car\nsky: sky\nrail track: null\n"

# Labels 4x6 ('.' = void); predictions at their image's size: a is 4x6, b 8x12 (the label is half the image), c 4x6.
LABELS = {
    "a": ["SSSSSS", "CCC...", "RRRRWW", "PPTTWW"],
    "b": ["SSSSSS", "SSCCCC", "RRRRRR", "RRRRRR"],
    "c": ["SSSSSS", "WWWWWW", "RRR...", "TTTTTT"],
}
PREDICTIONS = {
    "a": ["sssssc", "ccrrrr", "rrrrww", "rwrrww"],
    "b": ["sssspp", "sscccc", "rrrrrr", "rrrww."],
    "c": ["ssssss", "wwwrrr", "rrrccc", "pppppp"],
}
IMAGE_SCALE = {"a": 1, "b": 2, "c": 1}


def _rgb(rows: list[str]) -> np.ndarray:
  colors = {code: color for code, (_, color) in THEIRS.items()} | {".": (0, 0, 0)}
  return np.array([[colors[ch] for ch in row] for row in rows], np.uint8)


def _write_external(root, labels=LABELS):
  """The external set: PNG images, labels as RGBA PNG (a: as Cityscapes' colour PNGs), RGB PNG (b) and a
  channels-last single-page TIFF (c)."""
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir()
  names = [name for name, _ in THEIRS.values()]
  colors = "\n".join(f"  {name}: {list(color)}" for name, color in THEIRS.values())
  (root / "metadata.yaml").write_text(f"task: semantic segmentation\nannotations: labels/\ncategories: {names}\n"
                                      f"colors:\n{colors}\n".replace("'", ""))
  rng = np.random.default_rng(0)
  for stem, rows in labels.items():
    rgb = _rgb(rows)
    s = IMAGE_SCALE[stem]
    Image.fromarray(rng.integers(0, 256, (4 * s, 6 * s, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
    if stem == "a":
      Image.fromarray(np.concatenate([rgb, np.full((4, 6, 1), 255, np.uint8)], -1)).save(root / "labels" / "a.png")
    elif stem == "c":
      tifffile.imwrite(root / "labels" / "c.tif", rgb, photometric="rgb")
    else:
      Image.fromarray(rgb).save(root / "labels" / f"{stem}.png")


def _write_predictions(root, predictions=PREDICTIONS, sizes=None):
  """Predictions written by the prediction command's writer, each at its image's size (blocks of s x s pixels)."""
  writer = PredictionWriter(root, OURS)
  for stem, rows in predictions.items():
    s = IMAGE_SCALE[stem]
    category = np.array([[OUR_CODES.get(ch, -1) for ch in row] for row in rows], np.int32).repeat(s, 0).repeat(s, 1)
    if sizes and stem in sizes:
      category = fmt.resize_nearest(category, sizes[stem])
    is_thing = np.asarray(OURS.is_thing)[category]
    panoptic = np.where(category < 0, fmt.VOID, category * OURS.label_divisor + is_thing).astype(np.int32)
    scores = {int(v): 0.9 for v in np.unique(panoptic) if v >= 0}
    writer.write(stem, np.zeros(category.shape + (3,), np.uint8), panoptic, scores)
  writer.close()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  root = tmp_path_factory.mktemp("semantic")
  _write_external(root / "external")
  _write_predictions(root / "pred")
  (root / "map.yaml").write_text(CLASS_MAP)
  return root


def test_class_map_scores_pictures_and_json_through_the_command(sets, tmp_path):
  out, pictures = tmp_path / "r.json", tmp_path / "pictures"
  run = subprocess.run([sys.executable, "-m", "panoptic_jax.evaluate", "--gt", str(sets / "external"), "--pred",
                        str(sets / "pred"), "--class_map", str(sets / "map.yaml"), "--out", str(out), "--pictures",
                        str(pictures), "--max_pictures", "2"], capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stdout + run.stderr
  result = json.loads(out.read_text())
  sem = result["semantic"]
  # Counted by hand over the 58 scored pixels (72, less 6 void and 8 of rail track):
  #   road     tp 17 (a 5, b 9, c 3), GT 21, predicted 21 -> 17 / 25
  #   sidewalk tp 7, GT 10, predicted 10 (3 of them road pixels)     -> 7 / 13
  #   car      tp 6, GT 7, predicted 7                                -> 6 / 8
  #   sky      tp 17, GT 20 (2 predicted person, 1 car), predicted 17 -> 17 / 20
  expected = {"road": 17 / 25, "sidewalk": 7 / 13, "car": 6 / 8, "sky": 17 / 20}
  assert {n: e["iou"] for n, e in sem["per_class"].items()} == pytest.approx(expected, abs=1e-12)
  assert {n: (e["gt_pixels"], e["pred_pixels"]) for n, e in sem["per_class"].items()} == {
      "road": (21, 21), "sidewalk": (10, 10), "car": (7, 7), "sky": (20, 17)}
  assert sem["per_class"]["road"]["from"] == ["road", "parking"]
  assert sem["mIoU"] == pytest.approx(sum(expected.values()) / 4, abs=1e-12)
  assert sem["convention"] == "classes_with_union" and sem["mIoU_classes"] == ["road", "sidewalk", "car", "sky"]
  assert sem["pixel_accuracy"] == pytest.approx(47 / 58, abs=1e-12)
  assert result["pixels"] == {"total": 72, "void": 6, "ignored": 8, "scored": 58}
  assert result["ignored_categories"] == [{"name": "rail track", "pixels": 8, "share": pytest.approx(8 / 72)}]
  assert result["predicted_without_gt_counterpart"] == [{"name": "person", "pixels": 2}]
  assert result["mapping"]["parking"] == "road" and result["mapping"]["rail track"] is None
  confusion = result["confusion_matrix"]
  assert confusion["rows"] == ["road", "sidewalk", "car", "sky"]
  assert confusion["columns"] == ["road", "sidewalk", "car", "person", "sky", "void"]
  assert confusion["counts"] == [[17, 3, 0, 0, 0, 1], [3, 7, 0, 0, 0, 0], [1, 0, 6, 0, 0, 0], [0, 0, 1, 2, 17, 0]]
  assert "mIoU  " in run.stdout and "rail track (11.11%)" in run.stdout and "person (2 px)" in run.stdout

  # Pictures: the first two images (image | label | prediction at the label's size) and the confusion matrix.
  assert sorted(p.name for p in (pictures / "comparisons").iterdir()) == ["a.png", "b.png"]
  b = np.asarray(Image.open(pictures / "comparisons" / "b.png"))
  assert b.shape == (4, 3 * 6 + 2 * semantic_external.GAP, 3)
  assert (b[:, 6 + 4:12 + 4] == _rgb(LABELS["b"])).all()  # The label in the external set's colours.
  ours = np.array(OURS.colors + ((0, 0, 0),), np.uint8)
  assert (b[:, 12 + 8:] == ours[[[OUR_CODES.get(ch, -1) for ch in row] for row in PREDICTIONS["b"]]]).all()
  with Image.open(pictures / "confusion_matrix.png") as im:
    assert im.format == "PNG" and im.width > 5 * 28 and im.height > 4 * 28


def test_by_name_ignores_parking_and_rail_track(sets, tmp_path):
  out = tmp_path / "r.json"
  assert evaluate.main(["--gt", str(sets / "external"), "--pred", str(sets / "pred"), "--out", str(out)]) == 0
  result = json.loads(out.read_text())
  sem = result["semantic"]
  # The two parking pixels of image a (predicted road and sidewalk) leave the scores.
  expected = {"road": 16 / 23, "sidewalk": 7 / 12, "car": 6 / 8, "sky": 17 / 20}
  assert {n: e["iou"] for n, e in sem["per_class"].items()} == pytest.approx(expected, abs=1e-12)
  assert sem["pixel_accuracy"] == pytest.approx(46 / 56, abs=1e-12)
  assert result["categories_matched"] == "by name" and result["class_map"] is None
  assert [(i["name"], i["pixels"]) for i in result["ignored_categories"]] == [("parking", 2), ("rail track", 8)]
  assert result["ignored_categories"][0]["share"] == pytest.approx(2 / 72)


def test_a_perfect_prediction_and_the_two_mean_conventions(tmp_path):
  labels = {"a": ["RRRRRR", "RRRRRR", "RRRRRR", "RRRR.."]}
  _write_external(tmp_path / "gt", labels)
  _write_predictions(tmp_path / "same", {"a": ["rrrrrr", "rrrrrr", "rrrrrr", "rrrrcc"]})  # Equal where labelled.
  _write_predictions(tmp_path / "off", {"a": ["rrrrrr", "rrrrrr", "rrrrrr", "rrcc.."]})
  same = semantic_external.evaluate_external(str(tmp_path / "gt"), str(tmp_path / "same"), progress=False)
  assert same["semantic"]["mIoU"] == 1.0 and same["semantic"]["pixel_accuracy"] == 1.0
  # Car is predicted on 2 road pixels but absent from the GT: its IoU 0 counts in the headline mean (classes that
  # occur in the GT or are predicted), not in the mean over the classes present in the GT.
  off = semantic_external.evaluate_external(str(tmp_path / "gt"), str(tmp_path / "off"), progress=False)["semantic"]
  assert off["per_class"]["road"]["iou"] == pytest.approx(20 / 22) and off["per_class"]["car"]["iou"] == 0.0
  assert off["per_class"]["sky"]["iou"] is None  # Neither in the GT nor predicted.
  assert off["mIoU"] == pytest.approx(10 / 22) and off["mIoU_classes"] == ["road", "car"]
  assert off["mIoU_classes_with_gt"] == pytest.approx(20 / 22)


def test_errors_name_the_file(sets, tmp_path, capsys):
  gt, pred = str(sets / "external"), str(sets / "pred")

  # A class map entry that is not a GT category, another whose value is not ours.
  (tmp_path / "bad.yaml").write_text("road: road\ncarr: car\nsky: heaven\n")
  assert evaluate.main(["--gt", gt, "--pred", pred, "--class_map", str(tmp_path / "bad.yaml")]) == 2
  err = capsys.readouterr().err
  assert f"{tmp_path / 'bad.yaml'}: " in err and "'carr: car'" in err and "'sky: heaven'" in err
  assert "rail track" in err and "person" in err  # The names that exist on each side.

  # A prediction whose size no single factor explains.
  _write_predictions(tmp_path / "stretched", sizes={"b": (8, 20)})
  assert evaluate.main(["--gt", gt, "--pred", str(tmp_path / "stretched")]) == 2
  err = capsys.readouterr().err
  assert f"{tmp_path / 'stretched' / 'panoptic_maps' / 'b.tif'}: the prediction is 8x20" in err
  assert "labels/b.png is 4x6" in err

  # A label colour outside the palette.
  _write_external(tmp_path / "odd")
  rgb = _rgb(LABELS["b"])
  rgb[0, 0] = (1, 2, 3)
  Image.fromarray(rgb).save(tmp_path / "odd" / "labels" / "b.png")
  assert evaluate.main(["--gt", str(tmp_path / "odd"), "--pred", pred]) == 2
  err = capsys.readouterr().err
  assert f"{tmp_path / 'odd' / 'labels' / 'b.png'}: 1 colours are not in the metadata palette: [1, 2, 3] (1 px)" in err

  # A class map that maps nothing; a prediction missing; --class_map with a panoptic GT.
  (tmp_path / "void.yaml").write_text("road: null\n")
  assert evaluate.main(["--gt", gt, "--pred", pred, "--class_map", str(tmp_path / "void.yaml")]) == 2
  assert "no GT category maps to a predicted one" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    evaluate.main(["--gt", pred, "--pred", pred, "--class_map", str(sets / "map.yaml")])
  assert "--class_map applies to a GT with 'task: semantic segmentation'" in capsys.readouterr().err
  (tmp_path / "two").mkdir()
  _write_predictions(tmp_path / "two", {k: v for k, v in PREDICTIONS.items() if k != "c"})
  assert evaluate.main(["--gt", gt, "--pred", str(tmp_path / "two")]) == 2
  assert "1 GT images have no prediction: c" in capsys.readouterr().err
