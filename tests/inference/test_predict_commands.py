"""The prediction and export commands end to end, on the tiny model that has memorised two scenes (its workdir and
dataset come from tests/training/test_memorise.py, trained once per session): predictions score exactly as
`--mode=eval`, an exported artifact runs without flax and writes the same outputs, and bad inputs give one clear
error each."""

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from panoptic_jax import predict as predict_command
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.evaluation import evaluator as evaluator_lib
from panoptic_jax.inference import export, images, serving, trained_model
from panoptic_jax.inference.predictor import Predictor
from panoptic_jax.training import workdir as workdir_lib
from panoptic_jax.training import config as config_lib
from panoptic_jax.training import train
from tests.training import train_helpers as th
from tests.training.test_memorise import memorised_workdir

pytestmark = pytest.mark.slow


def _trained() -> pathlib.Path:
  return memorised_workdir()[0]


def _dataset() -> pathlib.Path:
  return memorised_workdir()[1]


def _predicted(name: str, *flags: str) -> pathlib.Path:
  """OUT of `predict` over the tiny validation set (once per session and flags)."""
  def compute():
    out = th.session_dir() / f"predicted_{name}"
    status = predict_command.main(["--workdir", str(_trained()), "--images", str(_dataset()),
                                   "--out", str(out), "--batch_size", "8", *flags])
    assert status == 0
    return out
  return th.memo(f"predicted_{name}", compute)


def _exported() -> pathlib.Path:
  def compute():
    out = th.session_dir() / "exported"
    export.export(trained_model.load(str(_trained())), str(out), platforms=("cpu", "cuda", "tpu"))
    return out
  return th.memo("exported", compute)


def _maps(location: pathlib.Path) -> dict[str, np.ndarray]:
  dataset = Dataset.open(location, require_images=False)
  return {name: dataset.read_panoptic(i) for i, name in enumerate(dataset.names)}


def test_predictions_score_exactly_as_the_evaluation_of_the_same_checkpoint():
  workdir = th.session_dir() / "eval_all"
  shutil.copytree(_trained(), workdir)
  config = config_lib.from_record(workdir_lib.Workdir(workdir).read_run(), "config.json")
  in_loop = train.run(config, str(workdir), "eval")["result"]
  assert in_loop["panoptic"]["Things"]["n"] > 0 and in_loop["panoptic"]["All"]["pq"] > 0.3  # A model that sees.
  gt = evaluator_lib.open_dataset_side(str(_dataset()))
  pred = evaluator_lib.open_dataset_side(str(_predicted("plain")))
  result = evaluator_lib.evaluate_sides(gt, pred, progress=False)
  for group in ("All", "Things", "Stuff"):
    for metric in ("pq", "sq", "rq"):
      assert result["panoptic"][group][metric] == pytest.approx(in_loop["panoptic"][group][metric], abs=1e-9)
  for name, values in in_loop["panoptic"]["per_category"].items():
    assert result["panoptic"]["per_category"][name] == pytest.approx(values, abs=1e-9), name
  assert result["semantic"]["mIoU"] == pytest.approx(in_loop["semantic"]["mIoU"], abs=1e-9)
  assert result["instance"]["computed"] and in_loop["instance"]["computed"]
  for metric in ("AP", "AP50", "AP75"):
    assert result["instance"][metric] == pytest.approx(in_loop["instance"][metric], abs=1e-9)


def test_the_output_is_a_dataset_at_each_images_own_size_with_scores_beside_the_maps():
  out = _predicted("plain")
  val = Dataset.open(_dataset())
  written = Dataset.open(out)  # images/ (links) and maps pair up: a dataset like any other.
  assert written.names == val.names and written.info.categories == val.info.categories
  for i in range(len(val)):
    assert written.read_panoptic(i).shape == val.read_image(i).shape[:2]
  assert sorted(p.stem for p in (out / "segments").glob("*.json")) == val.names


def test_a_second_run_skips_what_is_written_and_an_undecodable_image_is_counted_and_skipped(tmp_path, capsys):
  folder = tmp_path / "photos"
  folder.mkdir()
  for i, name in enumerate(["a.jpg", "b.png"]):
    Image.fromarray(np.full((40 + 8 * i, 70, 3), 60 * i, np.uint8)).save(folder / name)
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  argv = ["--workdir", str(_trained()), "--images", str(folder), "--out", str(tmp_path / "out"), "--batch_size", "8"]
  assert predict_command.main(argv) == 1  # Failures make the status 1; the others are written.
  summary = capsys.readouterr().out
  assert "2 written, 0 skipped (already written), 1 failed" in summary and "broken" in summary
  assert predict_command.main(argv) == 1
  assert "0 written, 2 skipped (already written), 1 failed" in capsys.readouterr().out


def test_two_processes_split_the_images_and_write_one_coco_json(tmp_path):
  out, port = tmp_path / "out", th.free_port()
  commands = [[sys.executable, "-m", "panoptic_jax.predict", "--workdir", str(_trained()), "--images", str(_dataset()),
               "--out", str(out), "--coco", "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2",
               "--process_id", str(k)] for k in range(2)]
  processes = [subprocess.Popen(c, env=th.subprocess_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for c in commands]
  try:
    outputs = [p.communicate(timeout=600) for p in processes]
  finally:
    for p in processes:
      th.kill(p)
  assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in outputs]
  assert [o.strip().splitlines()[-1].split(",")[0] for o, _ in outputs] == ["1 written", "1 written"]
  single, split = _maps(_predicted("plain")), _maps(out)
  assert split.keys() == single.keys()
  for name in single:
    np.testing.assert_array_equal(split[name], single[name])
  coco = json.loads((out / "coco" / "panoptic.json").read_text())
  assert sorted(a["image_id"] for a in coco["annotations"]) == sorted(single)


def test_the_exported_artifact_gives_the_models_maps(tmp_path):
  manifest = json.loads((_exported() / "manifest.json").read_text())
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  assert manifest["spec"]["categories"] == list(Dataset.open(_dataset()).info.categories)
  assert not any("semantic_head" in name for name in np.load(_exported() / "weights.npz").files)
  val = Dataset.open(_dataset())
  pictures = [val.read_image(i) for i in range(len(val))]
  in_process = Predictor.from_workdir(str(_trained()), batch_size=8).predict_batch(pictures)
  exported = Predictor.from_export(str(_exported()), batch_size=2).predict_batch(pictures)  # Another batch size.
  for a, b in zip(in_process, exported):
    np.testing.assert_array_equal(a.panoptic, b.panoptic)
    assert a.scores == pytest.approx(b.scores)


def test_export_as_onnx_gives_the_networks_logits(tmp_path):
  pytest.importorskip("onnxruntime")
  from panoptic_jax import export as export_command
  from panoptic_jax.inference import onnx_export
  argv = ["--workdir", str(_trained()), "--out", str(tmp_path / "art"), "--platforms", "cpu", "--format", "onnx"]
  assert export_command.main(argv) == 0
  model = trained_model.load(str(_trained()))
  predictor = Predictor(None, model.spec)
  crops = np.stack([predictor.prepare(Dataset.open(_dataset()).read_image(i))[0] for i in range(2)])
  expected = model.model()(crops)
  got = onnx_export.run_onnx(str(tmp_path / "art" / "model.onnx"), crops.astype(np.float32))
  for name in ("mask_logits", "class_logits"):
    np.testing.assert_allclose(got[name], np.asarray(expected[name]), atol=1e-4)


def test_serving_runs_without_flax_and_writes_what_predict_writes(tmp_path):
  out = tmp_path / "served"
  blocker = ("import sys\n"
             "class Block:\n"
             "  def find_spec(self, name, path=None, target=None):\n"
             "    if name.split('.')[0] in ('flax', 'optax', 'orbax', 'grain') or name.startswith(\n"
             "        ('panoptic_jax.model', 'panoptic_jax.training')):\n"
             "      raise ImportError('blocked in this test: ' + name)\n"
             "sys.meta_path.insert(0, Block())\n"
             "from panoptic_jax.inference import serving\n"
             "from panoptic_jax import cli\n"
             "cli.run(serving.main)\n")
  command = [sys.executable, "-c", blocker, "--model", str(_exported()), "--images", str(_dataset()),
             "--out", str(out), "--batch_size", "4"]
  done = subprocess.run(command, env=th.subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  expected = _predicted("plain")
  served, predicted = _maps(out), _maps(expected)
  assert served.keys() == predicted.keys()
  for name in served:
    np.testing.assert_array_equal(served[name], predicted[name])
    served_segments, predicted_segments = (json.loads((folder / "segments" / f"{name}.json").read_text())["segments"]
                                           for folder in (out, expected))
    assert served_segments and len(served_segments) == len(predicted_segments)
    for a, b in zip(served_segments, predicted_segments):
      assert {**a, "score": pytest.approx(b["score"], abs=1e-6)} == b


def test_another_inference_size_gives_maps_at_each_images_size_and_a_bad_one_names_the_valid_sides():
  val = Dataset.open(_dataset())
  image = val.read_image(0)
  larger = Predictor.from_workdir(str(_trained()), crop_size=(97, 193))
  assert larger.spec.crop_size == (97, 193) and larger(image).panoptic.shape == image.shape[:2]
  with pytest.raises(config_lib.ConfigError, match="nearest valid sides to 100 are 97 and 129"):
    trained_model.load(str(_trained()), crop_size=(100, 129))


def test_bad_inputs_give_one_clear_error_each(tmp_path):
  empty_run = tmp_path / "run"
  empty_run.mkdir()
  shutil.copy(_trained() / "config.json", empty_run / "config.json")
  with pytest.raises(workdir_lib.WorkdirError, match="no checkpoint"):
    trained_model.load(str(empty_run))
  with pytest.raises(workdir_lib.WorkdirError, match="no trained run"):
    trained_model.load(str(tmp_path))
  (tmp_path / "empty").mkdir()
  with pytest.raises(images.NoImagesError, match="empty"):
    images.ImageSource.open(str(tmp_path / "empty"))
  old = tmp_path / "old_artifact"
  shutil.copytree(_exported(), old)
  manifest = json.loads((old / "manifest.json").read_text())
  (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
  with pytest.raises(serving.ArtifactError, match="format version 0"):
    serving.load(str(old))
  with pytest.raises(serving.ArtifactError, match="not an exported model"):
    serving.load(str(tmp_path))


def test_an_output_location_that_cannot_be_written_is_one_line_of_error(tmp_path):
  blocked = tmp_path / "a_file"
  blocked.write_text("OUT would have to be a folder inside this file")
  command = [sys.executable, "-m", "panoptic_jax.predict", "--workdir", str(_trained()), "--images",
             str(_dataset()), "--out", str(blocked / "out")]
  done = subprocess.run(command, env=th.subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith("error: ") and str(blocked) in done.stderr
