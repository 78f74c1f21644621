"""User errors out of the commands: one line on stderr, exit status 2, no traceback (unless asked for)."""

import subprocess
import sys

import pytest

from tests.training import train_helpers as th


def _main(tmp_path, *flags, config="demo", env=None):
  command = [sys.executable, "-m", "panoptic_jax.main", f"--config={th.REPO_ROOT / 'configs' / config}.py",
             f"--workdir={tmp_path / 'run'}", *flags]
  return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=th.REPO_ROOT,
                        env=env or th.subprocess_env(1))


def _one_error_line(result) -> str:
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("flags,message", [
    (["--config.train.stepz=3"], "error: --config.train.stepz: no such config field (did you mean 'steps'?)"),
    (["--config.train.steps=3.5"], "error: flag --config.train.steps=3.5: invalid literal for int()"),
    (["--config.input.crop_size=65,65", "--config.input.crop_size=97,97"],
     "error: --config.input.crop_size given more than once"),
    (["--config.input.crop_size=64,64"], "error: config.input.crop_size: expected sides of 32 * k + 1 pixels"),
])
def test_user_errors_are_one_line(tmp_path, flags, message):
  line = _one_error_line(_main(tmp_path, *flags))
  assert message in line, line


def test_a_missing_dataset_is_one_line_naming_it(tmp_path):
  line = _one_error_line(_main(tmp_path, "--config.dataset.train=/nonexistent/train",
                               "--config.dataset.val=/nonexistent/val", config="custom"))
  assert "/nonexistent/train" in line and "metadata.yaml" in line, line


def test_verbose_shows_the_traceback(tmp_path):
  result = _main(tmp_path, "--config.input.crop_size=64,64", "--verbose")
  assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_the_other_commands_report_bad_locations_without_a_traceback(tmp_path):
  """The evaluator stops with one error line; the validator reports the location as invalid (its exit status 1)."""
  for module, args, status in (("panoptic_jax.evaluate", ["--gt", str(tmp_path / "missing"), "--pred", "x"], 2),
                               ("panoptic_jax.data.validate", [str(tmp_path / "missing")], 1)):
    result = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                            cwd=th.REPO_ROOT, env=th.subprocess_env(1))
    assert result.returncode == status and "Traceback" not in result.stderr, (module, result.stderr[-2000:])
    assert str(tmp_path / "missing") in result.stdout + result.stderr, (module, result.stderr[-2000:])
