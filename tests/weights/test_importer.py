"""The importer through its public functions: class rows by name, what fills what, errors that name both sides, the
`inspect` command, and a run that starts from another run's weights (`config.model.init_from`)."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from panoptic_jax.data import synthetic
from panoptic_jax.model import kmax_deeplab
from panoptic_jax.weights import importer, init_from
from tests.training import train_helpers as th
from tests.training.test_memorise import memorised_workdir

PRESET = "kmax_tiny"
NUM_CLASSES = 5


def _variables(preset=PRESET, num_classes=NUM_CLASSES):
  return importer.variables(importer.model_variables(kmax_deeplab.abstract_model(preset, num_classes)))


def _own_tensors(preset=PRESET, num_classes=NUM_CLASSES, seed=0):
  """A file in this project's naming (as `export` writes weights.npz) with random values."""
  rng = np.random.default_rng(seed)
  return {f"params.{name}": rng.normal(size=t.shape).astype(np.float32)
          for name, t in _variables(preset, num_classes).items()}


def test_class_rows_match_by_name_reorder_and_initialise_new_ones():
  rows, report = importer.class_rows(("car", "road", "sky"), 3, ("road", "car", "bus"), 3)
  np.testing.assert_array_equal(rows, [1, 0, -1, 3])  # void (last) maps to the file's void
  assert report == {"file": 3, "model": 3, "kept": 2, "reordered": True, "new": ["bus"], "dropped": ["sky"]}
  rows, report = importer.class_rows(("a", "b"), 2, ("a", "b"), 2)
  np.testing.assert_array_equal(rows, [0, 1, 2])
  assert not report["reordered"] and report["kept"] == 2
  rows, _ = importer.class_rows(("b", "a"), 2, ("a", "b"), 2, file_void=False)  # a head without a void row
  np.testing.assert_array_equal(rows, [1, 0, -1])


def test_class_rows_without_names_are_kept_in_order_only_when_counts_agree():
  rows, report = importer.class_rows(None, 3, ("a", "b", "c"), 3)
  np.testing.assert_array_equal(rows, [0, 1, 2, 3])
  assert "in order" in report["note"]
  rows, report = importer.class_rows(None, 5, ("a", "b", "c"), 3)
  np.testing.assert_array_equal(rows, [-1, -1, -1, 5])
  assert report["kept"] == 0


def test_own_naming_fills_every_variable_and_keeps_class_rows_by_name():
  tensors = _own_tensors()
  targets = _variables()
  file_names = ("sky", "road", "car", "bus", "person")
  model_names = ("road", "sky", "truck", "car", "person")
  values, report = importer.plan(tensors, targets, kmax_deeplab.get_config(PRESET), NUM_CLASSES, source="f.npz",
                                 class_names=model_names, file_class_names=file_names)
  assert report.scheme == "panoptic_jax" and not report.left_at_init and not report.unused_expected
  kernel = "transformer_decoder.predictor.class_head.kernel"
  np.testing.assert_array_equal(values[kernel].rows, [1, 0, -1, 2, 4, 5])
  assert report.classes["new"] == ["truck"] and report.classes["dropped"] == ["bus"]
  # Every parameter but the new class's rows came from the file.
  class_params = sum(int(np.prod(t.shape)) // t.shape[-1] for n, t in targets.items()
                     if t.is_param and n.endswith(("class_head.kernel", "class_head.bias", "classifier.kernel",
                                                   "classifier.bias")))
  assert report.parameters_loaded == report.parameters_total - class_params


def test_a_file_of_another_model_is_one_error_naming_the_tensor_and_both_shapes():
  tensors = _own_tensors(preset="kmax_small")
  with pytest.raises(importer.WeightsImportError) as error:
    importer.plan(tensors, _variables(), kmax_deeplab.get_config(PRESET), NUM_CLASSES, source="small.npz")
  message = str(error.value)
  assert "small.npz" in message and "params.backbone.stages.0" in message, message
  assert "(16, 16)" in message and "(8, 8)" in message, message


def test_an_unexpected_tensor_is_an_error_unless_excluded():
  tensors = {**_own_tensors(), "extra.weight": np.zeros((3, 3), np.float32)}
  targets = _variables()
  arch = kmax_deeplab.get_config(PRESET)
  with pytest.raises(importer.WeightsImportError, match=r"extra\.weight \(3, 3\)"):
    importer.plan(tensors, targets, arch, NUM_CLASSES, source="f.npz")
  _, report = importer.plan(tensors, targets, arch, NUM_CLASSES, source="f.npz", exclude=r"^extra\.")
  assert report.excluded_tensors == ["extra.weight"] and not report.excluded_variables


def test_exclude_leaves_our_variables_at_initialisation():
  _, report = importer.plan(_own_tensors(), _variables(), kmax_deeplab.get_config(PRESET), NUM_CLASSES,
                            source="f.npz", exclude=r"^(transformer_decoder|pixel_decoder|semantic_head)\.")
  assert report.loaded and all(name.startswith("backbone.") for name in report.loaded)
  assert all(not name.startswith("backbone.") for name in report.left_at_init)
  assert report.excluded_variables == report.left_at_init
  assert len(report.excluded_tensors) == len(report.left_at_init)


def test_assign_places_values_in_the_state_and_keeps_new_class_rows():
  model = kmax_deeplab.build_model(PRESET, NUM_CLASSES, rngs=__import__("flax").nnx.Rngs(0))
  state = importer.model_variables(model)
  tensors = _own_tensors(seed=3)
  values, _ = importer.plan(tensors, importer.variables(state), kmax_deeplab.get_config(PRESET), NUM_CLASSES,
                            source="f.npz", class_names=("a", "b", "c", "d", "e"),
                            file_class_names=("b", "a", "x", "y", "z"))
  new = importer.assign(state, values)
  flat_new = {importer.checkpoint.leaf_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(new["params"])[0]}
  flat_old = {importer.checkpoint.leaf_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
  stem = "backbone.stem.conv.kernel"
  np.testing.assert_array_equal(flat_new[stem], tensors[f"params.{stem}"])
  head = "transformer_decoder.predictor.class_head.kernel"
  source = tensors[f"params.{head}"]
  np.testing.assert_array_equal(flat_new[head][:, 0], source[:, 1])     # a <- the file's a (its row 1)
  np.testing.assert_array_equal(flat_new[head][:, 1], source[:, 0])
  np.testing.assert_array_equal(flat_new[head][:, 2:5], flat_old[head][:, 2:5])  # new classes: initialisation
  np.testing.assert_array_equal(flat_new[head][:, 5], source[:, 5])     # void


def test_inspect_lists_what_fills_what(tmp_path):
  path = tmp_path / "weights.npz"
  np.savez(path, **_own_tensors())
  out = subprocess.run([sys.executable, "-m", "panoptic_jax.weights", "inspect", str(path), "--preset", PRESET,
                        "--num_classes", str(NUM_CLASSES), "--list", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, check=False, cwd=th.REPO_ROOT)
  assert out.returncode == 0, out.stderr
  assert "panoptic_jax" in out.stdout and "100.0%" in out.stdout, out.stdout
  assert "backbone.stem.conv.kernel (7, 7, 3, 8) <- params.backbone.stem.conv.kernel (7, 7, 3, 8)" in out.stdout
  report = json.loads((tmp_path / "r.json").read_text())
  assert report["parameters_loaded"] == report["parameters_total"]
  wrong = subprocess.run([sys.executable, "-m", "panoptic_jax.weights", "inspect", str(path), "--preset",
                          "kmax_small"], capture_output=True, text=True, check=False, cwd=th.REPO_ROOT)
  assert wrong.returncode == 2 and "does not fit" in wrong.stderr and "Traceback" not in wrong.stderr, wrong.stderr


def test_a_workdir_is_a_source_with_its_category_names():
  source, _ = memorised_workdir()
  read = init_from.read_source(str(source))
  assert read.class_names == synthetic.INFO.categories
  names = tuple(reversed(synthetic.INFO.categories))
  _, report = importer.plan(read.tensors, _variables(num_classes=len(names)), kmax_deeplab.get_config(PRESET),
                            len(names), source=str(source), class_names=names, file_class_names=read.class_names)
  assert report.parameters_loaded == report.parameters_total and not report.left_at_init
  assert report.classes["kept"] == len(names) and report.classes["reordered"]


def test_a_run_starting_from_an_imported_backbone_learns_faster(tmp_path):
  """The wiring of `config.model.init_from` (a smoke test, not a timing): a run whose backbone comes from the
  memorised model's workdir (trained on scenes of the same kind) has a lower loss over the same steps than the run
  from scratch; the report is in the workdir; a resumed run does not import again."""
  source, _ = memorised_workdir()
  scratch = th.losses(th.one_device_run())
  workdir = tmp_path / "from_memorised"
  th.run_in_process(workdir, "train", devices=jax.devices()[:1], mesh__data=1, mesh__fsdp=1,
                    model__init_from=str(source),
                    model__init_from_exclude=r"^(pixel_decoder|transformer_decoder|semantic_head)\.")
  started = th.losses(workdir)
  assert sorted(started) == sorted(scratch)
  assert np.mean(list(started.values())) < np.mean(list(scratch.values())), (started, scratch)
  report = json.loads((workdir / init_from.REPORT).read_text())
  backbone = kmax_deeplab.param_breakdown(kmax_deeplab.abstract_model(PRESET, synthetic.INFO.num_classes))["backbone"]
  assert report["scheme"] == "panoptic_jax" and report["parameters_loaded"] == backbone
  assert all(name.startswith("backbone.") for name in report["loaded"])
  # Resuming (more steps) reads the run's own checkpoint, even if the source is gone.
  (workdir / init_from.REPORT).unlink()
  th.run_in_process(workdir, "train", devices=jax.devices()[:1], mesh__data=1, mesh__fsdp=1,
                    model__init_from=str(tmp_path / "gone"), train__steps=th.STEPS + 2)
  assert not (workdir / init_from.REPORT).exists()
  print("losses from scratch", scratch, "from the imported backbone", started)


def test_a_missing_weights_file_stops_the_run_before_anything_is_built(tmp_path):
  with pytest.raises(importer.WeightsImportError, match=r"no weights file at .*R-50\.pkl.*README"):
    th.run_in_process(tmp_path / "run", "train", model__init_from=str(tmp_path / "weights" / "R-50.pkl"))
  assert not (tmp_path / "run" / "checkpoints").exists()
