"""`config.model.init_from`: a run that starts without a checkpoint of its own begins from published weights.

The location is a weights file (local or `s3://`; `.pth`, `.pkl`, `.safetensors`, `.npz`, read by `readers`
without executing anything) or another run's workdir (its newest checkpoint, with its categories from config.json).
A resumed run never imports again: its own checkpoint wins.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging

from panoptic_jax.model.kmax_deeplab import KMaXConfig
from panoptic_jax.training import checkpoint
from panoptic_jax.training import workdir as workdir_lib
from panoptic_jax.weights import importer, readers

REPORT = "init_from.json"


@dataclasses.dataclass(frozen=True)
class Source:
  """A file's tensors by name, and its class names when it records them (a workdir's config.json)."""
  tensors: dict[str, np.ndarray]
  class_names: tuple[str, ...] | None = None


def _is_workdir(location: str) -> bool:
  return "://" not in location and os.path.isdir(location)


def check_source(location: str, endpoint_url: str | None = None) -> None:
  """Raises WeightsImportError when `location` is neither a weights file nor a run's workdir: called before
  anything is built or compiled, so that a path left unfilled in a recipe fails at once."""
  if _is_workdir(location):
    if workdir_lib.Workdir(location).read_run() is None:
      raise importer.WeightsImportError(f"config.model.init_from: {location} is a folder without "
                                        f"{workdir_lib.CONFIG}; expected a weights file or a training run's workdir")
    return
  storage, name = readers.open_file_location(location, endpoint_url)
  if not storage.exists(name):
    raise importer.WeightsImportError(
        f"config.model.init_from: no weights file at {location}; download it from the project that publishes it "
        "(README, 'Start from published weights': nothing is downloaded at run time), or set "
        "--config.model.init_from='' to start from random weights")


def read_source(location: str, endpoint_url: str | None = None) -> Source:
  """The tensors of a weights file or of a workdir's newest checkpoint (names as `checkpoint.leaf_name`)."""
  check_source(location, endpoint_url)
  if not _is_workdir(location):
    return Source(readers.read_tensors(location, endpoint_url))
  from panoptic_jax.inference import trained_model  # The model-building stack, only for this kind of source.
  trained = trained_model.load(location)
  tree = {"params": trained.params, "model_state": trained.model_state}
  names = importer.variables(tree)
  tensors = {}
  for root in tree:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree[root])[0]:
      if checkpoint.leaf_name(path) in names:
        tensors[checkpoint.leaf_name(path)] = np.asarray(leaf)
  return Source(tensors, tuple(trained.info.categories))


def initialise(state: dict[str, Any], location: str, arch: KMaXConfig, num_classes: int, *,
               class_names: Sequence[str], exclude: str = "", endpoint_url: str | None = None
               ) -> tuple[dict[str, Any], importer.ImportReport]:
  """`state` (`{"params", "model_state", ...}`) with the weights at `location` imported; raises WeightsImportError
  when the file does not fit (before anything is changed)."""
  source = read_source(location, endpoint_url)
  values, report = importer.plan(source.tensors, importer.variables(state), arch, num_classes, source=location,
                                 class_names=class_names, file_class_names=source.class_names, exclude=exclude)
  return importer.assign(state, values), report


def write_report(report: importer.ImportReport, workdir: workdir_lib.Workdir) -> None:
  workdir.storage.write_bytes(REPORT, json.dumps(report.to_json(), indent=1).encode())
  logging.info("%s\n  (the full report: %s)", report.summary(), workdir.url(REPORT))
