"""`python -m panoptic_jax.evaluate`: COCO and project-format sides in any combination, JSON output, clear errors."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from panoptic_jax import evaluate
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.evaluation import coco_format

SAMPLE = "panopticapi_sample"


def _coco_args(root, which, name):
  return [f"--{which}_json", str(root / f"{name}.json"), f"--{which}_folder", str(root / name)]


def _write_dataset(target: pathlib.Path, coco_json: pathlib.Path, coco_folder: pathlib.Path) -> fmt.DatasetInfo:
  """A project-format copy of a COCO panoptic side (crowd -> VOID, stuff merged), without images."""
  side = coco_format.CocoPanoptic.open(coco_json, coco_folder)
  gt_side = coco_format.CocoPanoptic.open(coco_json.parent / "panoptic_examples.json",
                                          coco_json.parent / "panoptic_examples")
  categories = gt_side.categories
  rng = np.random.default_rng(0)
  colors = {}
  while len(colors) < len(categories):
    colors[tuple(int(x) for x in rng.integers(1, 256, 3))] = None
  info = fmt.DatasetInfo(tuple(c.name for c in categories), tuple(colors), tuple(c.isthing for c in categories))
  (target / "panoptic_maps").mkdir(parents=True)
  (target / "metadata.yaml").write_text(fmt.metadata_yaml(info))
  index = {c.id: k for k, c in enumerate(categories)}
  for key in side.annotations:
    loaded = side.load(key, index, 1000, is_gt=True)
    panoptic = loaded.panoptic.copy()
    panoptic[loaded.crowd != -1] = fmt.VOID
    (target / "panoptic_maps" / f"{key}.tif").write_bytes(fmt.encode_annotation(panoptic, info))
  return info


def test_coco_vs_coco_writes_json(fixtures, tmp_path, capsys):
  root = fixtures / SAMPLE
  out = tmp_path / "r.json"
  code = evaluate.main(_coco_args(root, "gt", "panoptic_examples")
                       + _coco_args(root / "derived_predictions", "pred", "pred_edits") + ["--out", str(out)])
  assert code == 0
  printed = capsys.readouterr().out
  assert "All" in printed and "mIoU" in printed and "AP not computed" in printed
  result = json.loads(out.read_text())
  expected = json.loads((root / "expected_results.json").read_text())["cases"]["panopticapi_sample_pred_edits"]
  assert result["panoptic"]["All"]["pq"] == pytest.approx(expected["panopticapi"]["All"]["pq"], abs=1e-9)
  assert result["semantic"]["convention"] == "classes_with_gt"


def test_coco_vs_coco_runs_without_jax(fixtures, tmp_path):
  """COCO files are counted on the host: the command does not pay JAX's start-up (about a second)."""
  root = fixtures / SAMPLE
  args = _coco_args(root, "gt", "panoptic_examples") + _coco_args(root / "derived_predictions", "pred", "pred_edits")
  program = ("import sys\nfrom panoptic_jax import evaluate\n"
             f"assert evaluate.main({args!r}) == 0\nassert 'jax' not in sys.modules, 'JAX was imported'\n")
  done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                        cwd=pathlib.Path(__file__).parents[2])
  assert done.returncode == 0, done.stderr[-3000:]
  assert "PQ" in done.stdout


def test_an_unreadable_png_in_a_worker_process_is_named(fixtures, tmp_path):
  """COCO against COCO reads in worker processes: an error there reaches the command's message."""
  root = fixtures / SAMPLE
  folder = tmp_path / "pred"
  shutil.copytree(root / "panoptic_examples", folder)
  broken = sorted(folder.iterdir())[-1]
  broken.write_bytes(b"not a png")
  done = subprocess.run([sys.executable, "-m", "panoptic_jax.evaluate", *_coco_args(root, "gt", "panoptic_examples"),
                         "--pred_json", str(root / "panoptic_examples.json"), "--pred_folder", str(folder)],
                        capture_output=True, text=True, timeout=120, cwd=pathlib.Path(__file__).parents[2])
  assert done.returncode == 2, done.stderr[-3000:]
  assert f"{broken}: cannot read the PNG" in done.stderr


def test_dataset_and_coco_sides_mix(fixtures, tmp_path):
  root = fixtures / SAMPLE
  _write_dataset(tmp_path / "gt_ds", root / "panoptic_examples.json", root / "panoptic_examples")
  out = tmp_path / "r.json"
  # Project-format GT (crowd became VOID) vs the COCO GT as a prediction: its crowd segments lie on VOID, forgiven.
  assert evaluate.main(["--gt", str(tmp_path / "gt_ds")] + _coco_args(root, "pred", "panoptic_examples")
                       + ["--out", str(out)]) == 0
  result = json.loads(out.read_text())["panoptic"]
  assert result["All"]["pq"] == 1.0 and result["All"]["n"] == 8
  assert sum(e["fp"] for e in result["per_category"].values()) == 0
  # The other way round, and dataset vs dataset.
  assert evaluate.main(_coco_args(root, "gt", "panoptic_examples") + ["--pred", str(tmp_path / "gt_ds"),
                                                                       "--out", str(out)]) == 0
  result = json.loads(out.read_text())["panoptic"]
  assert result["All"]["pq"] == 1.0  # Crowd GT pixels predicted as VOID: nothing to count.
  assert evaluate.main(["--gt", str(tmp_path / "gt_ds"), "--pred", str(tmp_path / "gt_ds"), "--out", str(out)]) == 0
  assert json.loads(out.read_text())["panoptic"]["All"]["pq"] == 1.0


def test_mismatched_images_unknown_category_and_shape_errors(fixtures, tmp_path, capsys):
  root = fixtures / SAMPLE
  gt_args = _coco_args(root, "gt", "panoptic_examples")
  data = json.loads((root / "panoptic_examples.json").read_text())

  # One image missing from the predictions.
  missing = dict(data, annotations=data["annotations"][:1])
  (tmp_path / "missing.json").write_text(json.dumps(missing))
  assert evaluate.main(gt_args + ["--pred_json", str(tmp_path / "missing.json"), "--pred_folder",
                                  str(root / "panoptic_examples")]) == 2
  err = capsys.readouterr().err
  assert "have no prediction" in err and data["annotations"][1]["file_name"][:-4] in err

  # A predicted category the GT does not have (matched by name across formats).
  _write_dataset(tmp_path / "gt_ds", root / "panoptic_examples.json", root / "panoptic_examples")
  renamed = dict(data, categories=[dict(c, name="martian" if c["name"] == "person" else c["name"])
                                   for c in data["categories"]])
  (tmp_path / "renamed.json").write_text(json.dumps(renamed))
  assert evaluate.main(["--gt", str(tmp_path / "gt_ds"), "--pred_json", str(tmp_path / "renamed.json"),
                        "--pred_folder", str(root / "panoptic_examples")]) == 2
  assert "martian" in capsys.readouterr().err

  # Shapes differ.
  from PIL import Image
  (tmp_path / "small").mkdir()
  for ann in data["annotations"]:
    with Image.open(root / "panoptic_examples" / ann["file_name"]) as im:
      im.crop((0, 0, im.width - 8, im.height)).save(tmp_path / "small" / ann["file_name"])
  for ann in data["annotations"]:
    for seg in ann["segments_info"]:
      seg.pop("area", None)
  (tmp_path / "small.json").write_text(json.dumps(data))
  assert evaluate.main(gt_args + ["--pred_json", str(tmp_path / "small.json"), "--pred_folder",
                                  str(tmp_path / "small")]) == 2
  err = capsys.readouterr().err
  assert "same size" in err

  # Neither or both forms of a side.
  with pytest.raises(SystemExit):
    evaluate.main(gt_args)
