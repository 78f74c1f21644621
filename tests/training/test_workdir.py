"""Coming back to a workdir: the run's own config, no checkpoint ever moved for a mistake, one run at a time."""

import json
import os
import shutil
import subprocess

import pytest

from panoptic_jax.training import checkpoint, train
from panoptic_jax.training import workdir as workdir_lib
from tests.training import train_helpers as th

pytestmark = pytest.mark.slow


def _copy_of_trained_run(name: str):
  trained, _ = th.mesh_8x1_run()
  copy = th.session_dir() / name
  shutil.copytree(trained, copy)
  return copy


def _listing(workdir) -> list[str]:
  return sorted(str(p.relative_to(workdir)) for p in (workdir / "checkpoints").rglob("*"))


def _main(workdir, *flags, config: bool = True, **overrides):
  command = th.main_command(workdir, "eval", th.tiny_dataset(), **overrides)
  if not config:  # Only the workdir and the flags: the run's own config.
    command = [a for a in command if not a.startswith("--config")]
  return subprocess.run(command + list(flags), capture_output=True, text=True, timeout=600, cwd=th.REPO_ROOT,
                        env=th.subprocess_env(8))


def test_eval_with_another_model_keeps_every_checkpoint_and_names_the_difference():
  workdir = _copy_of_trained_run("wrong_preset")
  before = _listing(workdir)
  result = _main(workdir, model__preset="kmax_small")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert ("model.preset: 'kmax_tiny' in the run, 'kmax_small' now. Leave out --config to use the run's own"
          in result.stderr), result.stderr[-3000:]
  assert _listing(workdir) == before


def test_a_checkpoint_that_does_not_fit_is_an_error_naming_the_first_array():
  """Without config.json to compare with, the checkpoint itself tells: nothing is moved, nothing evaluated."""
  workdir = _copy_of_trained_run("no_config_wrong_preset")
  (workdir / "config.json").unlink()
  before = _listing(workdir)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"step 6 .* in the checkpoint and .* in the model"):
    th.run_in_process(workdir, "eval", model__preset="kmax_small")
  assert _listing(workdir) == before


def test_eval_without_config_uses_the_runs_own_with_safe_overrides():
  workdir = _copy_of_trained_run("own_config")
  result = _main(workdir, "--config.eval.max_images=2", "--config.eval.num_visualizations=0", config=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Config override for this evaluation: eval.max_images: 4 -> 2" in result.stderr
  evaluations = [r for r in th.read_metrics(workdir) if "eval/PQ" in r]
  assert len(evaluations) == 2  # The run's own at the end of training, and this one.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["config"]["eval"]["max_images"] == 4  # An evaluation does not rewrite the run's config.


def test_eval_of_a_workdir_without_checkpoint_is_an_error(tmp_path):
  result = _main(tmp_path / "empty")
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert f"--mode=eval: {tmp_path / 'empty'} holds no checkpoint to evaluate" in result.stderr


def test_a_second_run_on_a_workdir_in_use_refuses_and_touches_nothing():
  workdir = _copy_of_trained_run("in_use")
  in_flight = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1234"  # Another run's save in progress.
  shutil.copytree(workdir / "checkpoints" / "6", in_flight)
  before = _listing(workdir)
  with workdir_lib.Workdir(workdir).lock():
    command = th.main_command(workdir, "train", th.tiny_dataset(), train__steps=8)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=th.REPO_ROOT,
                            env=th.subprocess_env(8))
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"{workdir} is in use by another run (pid {os.getpid()} on" in result.stderr
  assert _listing(workdir) == before


def test_a_validation_set_with_other_categories_is_refused_before_anything_compiles(tmp_path, monkeypatch):
  val = tmp_path / "val"
  shutil.copytree(th.tiny_dataset() / "val", val)
  metadata = (val / "metadata.yaml").read_text()
  (val / "metadata.yaml").write_text(metadata.replace("cyclist", "bicycle"))
  monkeypatch.setattr(train, "create_state", lambda *a, **k: pytest.fail("compiled before checking categories"))
  with pytest.raises(Exception, match=r"categories do not match those of .*missing \['cyclist'\]; not in .*"
                                      r"\['bicycle'\]"):
    th.run_in_process(tmp_path / "run", "train_and_eval", dataset__val=str(val))
