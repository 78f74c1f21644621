"""The progress line: rate and ETA over training steps only."""

from panoptic_jax.training import metrics_writer


def test_progress_rate_and_eta_leave_out_compilation_and_evaluation(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics_writer.time, "monotonic", lambda: clock[0])
  progress = metrics_writer.Progress(total_steps=1000, batch_size=8, first_step=0)
  clock[0] += 60.0  # Compilation, then the first step.
  progress.restart(0)
  clock[0] += 5.0  # 50 steps at 0.1 s.
  line = progress.line(50, {"loss": 1.25, "learning_rate": 0.01})
  assert line == "step 50/1000 | loss=1.25 | lr=0.01 | 80.00 img/s | ETA 0h01m35s"
  clock[0] += 30.0  # An evaluation.
  progress.restart(50)
  clock[0] += 20.0  # 100 steps at 0.2 s.
  assert progress.line(150, {"loss": 1.0}).endswith("| lr=nan | 40.00 img/s | ETA 0h02m50s")
