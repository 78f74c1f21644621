"""The training input's health: samples skipped because they failed to decode, segments that found no mask slot.

The input pipeline never stops on a bad file and never logs per image (data/pipeline.py, data/transforms.py):
  - a sample whose image or annotation fails to decode becomes a blank with `valid` False (the losses leave it out);
  - an image with more segments than mask slots loses its smallest thing instances, counted in `dropped_segments`.
The train step sums both over the global batch (`batch_counts`), so every process sees the same counts and takes the
same decision to stop. `InputHealth` turns them into per-window metrics, warnings that name the files, and the stop:

    health = InputHealth(train_dataset, global_batch_size=config.train.batch_size, max_skipped_fraction=0.01)
    health.note_batch(local_batch)            # every step: names this process's newly skipped files, once each
    counts = health.take_counts(history)      # at a logging step: sums over the window, removed from `history`
    problem = health.check(step, counts, len(history))  # warnings; a message when too many samples were skipped

In metrics.jsonl / TensorBoard, train/skipped_samples, train/dropped_segments and train/images_with_dropped_segments
are sums over each logging window (their total over a run is the sum of its records). With several processes each
names the skipped files of its own batch rows in its own log; the counts are global.

The stop rule: after `seen` samples in this run (since it started or resumed) of which `skipped` were skipped, stop
when skipped > max(max_skipped_fraction * seen, MIN_SKIPPED_TO_STOP). The floor keeps a few bad files among the
first batches from stopping a run whose overall fraction is fine; `max_skipped_fraction` 0 stops at the first skipped
sample and 1 never stops. The check happens at every logging step (`config.train.log_every`).
"""

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging

from panoptic_jax.data.dataset import Dataset

DEFAULT_MAX_SKIPPED_FRACTION = 0.01
MIN_SKIPPED_TO_STOP = 10
# Metric names of the counts: summed over the logging window in metrics.jsonl / TensorBoard (not averaged).
SKIPPED = "skipped_samples"
DROPPED = "dropped_segments"
OVERFLOWING = "images_with_dropped_segments"
COUNT_KEYS = (SKIPPED, DROPPED, OVERFLOWING)


def batch_counts(batch: Mapping) -> dict:
  """Counts over a batch, as int32 scalars (jittable; on a global batch they are global counts).

  Args:
    batch: "valid" bool [B] (False: a sample that failed to decode), "dropped_segments" int32 [B]; a missing key
      counts 0.

  Returns:
    {"skipped_samples", "dropped_segments", "images_with_dropped_segments"}: int32 [] each.
  """
  zero = jnp.zeros((), jnp.int32)
  skipped = jnp.sum(~jnp.asarray(batch["valid"], bool), dtype=jnp.int32) if "valid" in batch else zero
  if "dropped_segments" in batch:
    dropped = jnp.asarray(batch["dropped_segments"], jnp.int32)
    return {SKIPPED: skipped, DROPPED: jnp.sum(dropped, dtype=jnp.int32),
            OVERFLOWING: jnp.sum(dropped > 0, dtype=jnp.int32)}
  return {SKIPPED: skipped, DROPPED: zero, OVERFLOWING: zero}


class InputHealth:
  """Counts skipped samples and dropped segments over a run; names skipped files; decides when to stop.

  Attributes:
    skipped, seen: samples skipped / seen (all processes together) in this run so far.
    dropped_segments, overflowing_images: segments dropped for lack of mask slots, and the images they came from.
    named: dataset indices of the skipped files this process has named in the log.
  """

  def __init__(self, dataset: Dataset, global_batch_size: int,
               max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION):
    """Args: the training dataset (for file names), the global batch size, the stop threshold (module docstring).

    Raises:
      ValueError: max_skipped_fraction is not in [0, 1].
    """
    if isinstance(max_skipped_fraction, bool) or not 0 <= max_skipped_fraction <= 1:
      raise ValueError(f"config.input.max_skipped_fraction: expected a fraction in [0, 1] (0: stop at the first "
                       f"undecodable sample, 1: never stop), found {max_skipped_fraction!r}")
    self._dataset = dataset
    self._batch_size = int(global_batch_size)
    self.max_skipped_fraction = float(max_skipped_fraction)
    self.skipped = self.seen = 0
    self.dropped_segments = self.overflowing_images = 0
    self.named: set[int] = set()
    self._num_slots: int | None = None

  def note_batch(self, batch: Mapping[str, np.ndarray]) -> None:
    """Logs once the name of every file of this process's batch that was skipped (valid False) for the first time.

    Args:
      batch: this process's numpy batch: "valid" bool [b], "index" int32 [b], "slot_classes" int32 [b, N].
    """
    if self._num_slots is None and "slot_classes" in batch:
      self._num_slots = int(np.shape(batch["slot_classes"])[-1])
    if "valid" not in batch:
      return
    for index in np.asarray(batch["index"])[~np.asarray(batch["valid"], bool)].tolist():
      if index not in self.named:
        self.named.add(index)
        logging.warning("Skipped training sample %s: it failed to decode (the input pipeline's warning gives the "
                        "error); it stays in the stream as a blank the losses leave out, counted in "
                        "train/%s. `python -m panoptic_jax.data.validate` lists every undecodable file.",
                        self._describe(index), SKIPPED)

  def _describe(self, index: int) -> str:
    if not 0 <= index < len(self._dataset.examples):
      return f"#{index}"
    example = self._dataset.examples[index]
    files = [self._dataset.storage.url(p) for p in (example.image, example.annotation) if p is not None]
    return f"{example.name!r} ({', '.join(files)})"

  @staticmethod
  def take_counts(history: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Removes the count metrics from every step of a logging window and returns their sums over the window.

    Args:
      history: (step, metrics) of the steps since the last logging step; the metrics as host floats.

    Returns:
      {name: sum over the window} for the names of `batch_counts` present in the metrics.
    """
    sums: dict[str, float] = {}
    for _, metrics in history:
      for key in COUNT_KEYS:
        if key in metrics:
          sums[key] = sums.get(key, 0.0) + float(metrics.pop(key))
    return sums

  def check(self, step: int, counts: Mapping[str, float], num_steps: int) -> str | None:
    """Adds a logging window's counts to the run's totals, warns about dropped segments, applies the stop rule.

    Args:
      step: the last step of the window.
      counts: `take_counts` of the window.
      num_steps: the steps in the window.

    Returns:
      None, or the reason to stop training: more samples skipped than the rule allows (module docstring).
    """
    self.seen += num_steps * self._batch_size
    self.skipped += int(counts.get(SKIPPED, 0))
    self.dropped_segments += int(counts.get(DROPPED, 0))
    before, self.overflowing_images = self.overflowing_images, self.overflowing_images + int(counts.get(OVERFLOWING, 0))
    if _powers_of_ten_crossed(before, self.overflowing_images):
      slots = f"the {self._num_slots} mask slots" if self._num_slots else "the mask slots"
      logging.warning(
          "%d of the %d training samples so far had more segments than %s: %d segments were dropped (the "
          "smallest thing instances of each image; their pixels are left out of the mask losses). Raise "
          "--config.model.num_slots to keep them. Counted in train/%s and train/%s; this warning repeats only when "
          "the count of images reaches the next power of ten.", self.overflowing_images, self.seen, slots,
          self.dropped_segments, OVERFLOWING, DROPPED)
    if self.skipped > self.allowed_skips():
      return (f"{self.skipped} of the {self.seen} training samples read up to step {step} failed to decode and were "
              f"skipped, more than config.input.max_skipped_fraction={self.max_skipped_fraction:g} allows "
              f"({self.allowed_skips():g}; at least {MIN_SKIPPED_TO_STOP} are always allowed unless the fraction "
              "is 0). The warnings above name the files; `python -m panoptic_jax.data.validate LOCATION` lists every "
              "undecodable file. Fix or remove them, or raise --config.input.max_skipped_fraction.")
    return None

  def allowed_skips(self) -> float:
    """How many skipped samples the rule allows after `seen` samples (module docstring)."""
    if self.max_skipped_fraction == 0:
      return 0.0
    return max(self.max_skipped_fraction * self.seen, float(MIN_SKIPPED_TO_STOP))


def _powers_of_ten_crossed(before: int, after: int) -> bool:
  """Whether going from `before` to `after` reaches 1, 10, 100, ... for the first time."""
  if after <= before or after < 1:
    return False
  return before < 1 or len(str(after)) > len(str(before))
