"""The memory plan compiles the real train and eval steps for a TPU slice on this CPU-only machine (libtpu).

This is also where a kernel that lowers for XLA:CPU only would be caught: the tiny model's whole train step (losses,
matching, optimizer) must compile for TPU and carry none of the XLA:CPU formulations.
"""

import importlib.util
import json
import subprocess
import sys

import ml_collections
import pytest

from panoptic_jax import plan as plan_lib
from panoptic_jax.training.config import base_config
from tests.training import train_helpers as th

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (optional: pip install -r requirements-tpu.txt); the TPU compile needs it")

TOPOLOGY = "v5e:2x2"  # 4 chips: the smallest slice that still shards the batch.
TINY = ["--config.model.preset=kmax_tiny", "--config.input.crop_size=65,65", "--config.model.init_from=",
        "--config.eval.batch_size=4"]


def _tiny_config() -> ml_collections.ConfigDict:
  config = base_config()
  config.model.preset = "kmax_tiny"
  config.input.crop_size = (65, 65)
  config.train.batch_size = 8
  config.eval.batch_size = 4
  return config


def _check_step(step: dict | plan_lib.StepPlan) -> None:
  s = step if isinstance(step, dict) else vars(step)
  assert 0 < s["total_gib"] < s["hbm_gib"] == 15.75 and s["temporaries_gib"] > 0 and s["arguments_gib"] > 0
  assert s["total_gib"] == pytest.approx(s["arguments_gib"] + s["outputs_gib"] - s["aliased_gib"]
                                         + s["temporaries_gib"] + s["resident_gib"])
  assert s["verdict"] == "fits" and s["headroom_gib"] > 15 and not s["suggestions"]
  assert s["tflop"] > 0 and s["roofline_s"] > 0 and s["bound"] in ("compute", "memory")
  assert s["cpu_ops"] == 0, "the TPU program carries XLA:CPU formulations (ops/dispatch.py)"


@pytest.fixture(scope="module")
def eval_command(tmp_path_factory):
  """`python -m panoptic_jax.plan --mode=eval --json=...` started in the background: (process, the folder of its
  plan.json, stdout and stderr). It compiles the eval step while `tiny_plan` compiles the train step in this process:
  libtpu's compile-only executables do not go through the persistent compilation cache, so both compiles are paid in
  every session, and side by side the module waits for the longer one instead of both."""
  folder = tmp_path_factory.mktemp("plan")
  # Output to files, not pipes: nothing reads them until the command's test, and a full pipe would stall it.
  with open(folder / "stdout", "w") as stdout, open(folder / "stderr", "w") as stderr:
    process = subprocess.Popen(
        [sys.executable, "-m", "panoptic_jax.plan", f"--config={th.REPO_ROOT / 'configs' / 'demo.py'}",
         "--topology=v5e-4", "--mode=eval", f"--json={folder / 'plan.json'}", *TINY],
        stdout=stdout, stderr=stderr, cwd=th.REPO_ROOT, env=th.subprocess_env(1))
  yield process, folder
  th.kill(process)


@pytest.fixture(scope="module")
def tiny_plan(eval_command) -> plan_lib.Plan:
  """The train step (about 80 s: see `eval_command`, which this starts first)."""
  del eval_command
  return plan_lib.plan(_tiny_config(), TOPOLOGY, mode="train")


@needs_libtpu
def test_the_tiny_models_steps_compile_for_a_tpu_slice(tiny_plan):
  assert tiny_plan.num_chips == 4 and tiny_plan.mesh == {"data": 4, "fsdp": 1}
  assert tiny_plan.chip.name == "TPU v5e" and tiny_plan.chip.hbm_gib == 16
  assert 0.1 < tiny_plan.params_millions < 5 and 0 < tiny_plan.state_gib < 0.1
  (train,) = tiny_plan.steps
  assert (train.step, train.images_per_chip) == ("train", 2)
  _check_step(train)
  # The train step donates its state: the new state reuses the old one's buffers.
  assert train.aliased_gib > 0 and train.resident_gib == 0
  text = tiny_plan.format()
  assert "v5e:2x2" in text and "FITS" in text and "TFLOP per chip-step" in text


@needs_libtpu
def test_a_recipe_that_does_not_fit_gets_suggestions(tiny_plan):
  """The verdict and the suggestions, against a chip smaller than the tiny step needs."""
  step = tiny_plan.steps[0]
  hbm = step.total_gib * 0.8
  config = _tiny_config()
  advice = plan_lib._suggestions(config, "train", 2, step.total_gib, step.temporaries_gib, 0.0, hbm, 1, 4)
  assert plan_lib._verdict(step.total_gib, hbm) == "does not fit"
  assert [a.split(":")[0].split(" ")[0] for a in advice] == [
      "--config.model.dtype=bfloat16", "--config.model.remat=True", "1"]
  assert "(--config.train.batch_size=4," in advice[-1]
  # A state that takes a good part of the chip: shard it.
  advice = plan_lib._suggestions(config, "train", 2, step.total_gib, step.temporaries_gib, hbm / 2, hbm, 1, 4)
  assert any(a.startswith("--config.mesh.fsdp=4: shard") for a in advice)
  assert plan_lib._verdict(step.total_gib, step.total_gib * 1.05) == "tight"


@needs_libtpu
def test_the_command_writes_the_report_as_json(eval_command):
  process, folder = eval_command
  process.wait(timeout=300)
  result = subprocess.CompletedProcess(process.args, process.returncode, (folder / "stdout").read_text(),
                                       (folder / "stderr").read_text())
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Target: v5e:2x2 (4 x TPU v5e" in result.stdout and "eval step" in result.stdout, result.stdout
  report = json.loads((folder / "plan.json").read_text())
  assert report["num_chips"] == 4 and [s["step"] for s in report["steps"]] == ["eval"]
  evaluation = report["steps"][0]
  assert evaluation["images_per_chip"] == 1
  _check_step(evaluation)
  # The evaluation does not read the Adam moments, but a run keeps them on the chip.
  assert evaluation["resident_gib"] > 0


@pytest.mark.parametrize("name,expected", [
    ("v5e:2x4", "v5e:2x4"), ("v5e-8", "v5e:2x4"), ("v5litepod-16", "v5e:4x4"), ("v6e-4", "v6e:2x2"),
    ("v4-8", "v4:2x2x1"), ("v4:2x2x2", "v4:2x2x2"), ("v5p-16", "v5p:2x2x2"), ("V5E:2X2", "v5e:2x2"),
])
def test_topology_names(name, expected):
  assert plan_lib.parse_topology(name).name == expected


@pytest.mark.parametrize("name,message", [
    ("v9:2x2", "unknown TPU generation 'v9'"), ("v5e-6", "6 chips is not a slice size"),
    ("v4:2x2", "a v4 slice has 3 axes"), ("v5e", "not a topology name"), ("v4-7", "is not a slice size"),
])
def test_bad_topology_names_say_what_is_expected(name, message):
  with pytest.raises(plan_lib.PlanError, match="expected GEN:AxB") as error:
    plan_lib.parse_topology(name)
  assert message in str(error.value)


def test_without_libtpu_the_error_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(plan_lib.importlib.util, "find_spec", lambda name: None)
  monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
  with pytest.raises(plan_lib.PlanError, match="pip install -r requirements-tpu.txt"):
    plan_lib.tpu_devices(plan_lib.parse_topology("v5e:2x2"))


def test_a_bad_topology_is_one_error_line():
  result = subprocess.run(
      [sys.executable, "-m", "panoptic_jax.plan", f"--config={th.REPO_ROOT / 'configs' / 'demo.py'}",
       "--topology=v5e:3"],
      capture_output=True, text=True, timeout=120, cwd=th.REPO_ROOT, env=th.subprocess_env(1))
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "error: --topology=v5e:3:" in result.stderr and "expected GEN:AxB" in result.stderr, result.stderr
