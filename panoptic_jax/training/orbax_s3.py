"""Orbax checkpoints in `s3://` locations, written by tensorstore's own S3 driver.

Orbax writes `gs://` natively (tensorstore's `gcs` driver for the arrays, etils.epath for the small files), but its
array specs know only `gs://` and local paths: orbax-checkpoint 0.12.8 turns `s3://bucket/x` into a local file path
`s3:/bucket/x` (an S3 port is google/orbax#2739, unmerged). Tensorstore itself has an S3 driver. `install()` routes
Orbax's kvstore specs for `s3://` locations to it: the spec is built as for the same path on GCS (so every OCDBT
layer, per-process database and read-coalescing option is Orbax's own), then each `gcs` base is replaced by the
equivalent `s3` one. The small files (metadata, the Grain iterator state, the commit marker) go through etils.epath,
i.e. fsspec's s3fs, which honours the same endpoint and credentials.

Endpoint and credentials follow the dataset rules (panoptic_jax/data/storage.py): the endpoint is
`AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else AWS itself; credentials come from the standard AWS chain, which
tensorstore's driver reads the same way (environment, shared files and `AWS_PROFILE`). The region is
`AWS_REGION` / `AWS_DEFAULT_REGION` when set.

An object store has no atomic rename of a folder, so checkpoints in object stores are marked complete by a commit
file (`commit_success.txt`, Orbax's COMMIT_FILE atomicity, the one it uses on GCS) instead of a rename:
`ATOMICITY_FOR_OBJECT_STORES`.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint._src.serialization import tensorstore_utils

# The completion marker of checkpoints in buckets (see the module docstring).
ATOMICITY_FOR_OBJECT_STORES = ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)
COMMIT_MARKER = "commit_success.txt"

_orbax_build_kvstore_tspec = tensorstore_utils.build_kvstore_tspec


def is_object_store(location: str) -> bool:
  return str(location).startswith(("s3://", "gs://"))


def s3_driver_options() -> dict[str, str]:
  """The endpoint and region of tensorstore's `s3` driver, from the environment (see the module docstring)."""
  options = {}
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  if endpoint:
    options["endpoint"] = endpoint
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if region:
    options["aws_region"] = region
  return options


def _gcs_to_s3(spec: Any) -> Any:
  """`spec` with every `{"driver": "gcs", "bucket", "path"}` replaced by the same bucket and path on S3."""
  if isinstance(spec, dict):
    if spec.get("driver") in ("gcs", "gcs_grpc"):
      return {"driver": "s3", "bucket": spec["bucket"], "path": spec["path"], **s3_driver_options()}
    return {key: _gcs_to_s3(value) for key, value in spec.items()}
  if isinstance(spec, list):
    return [_gcs_to_s3(value) for value in spec]
  return spec


def _build_kvstore_tspec(directory: Any, name: str | None = None, **kwargs: Any) -> dict[str, Any]:
  directory = str(directory)
  if not directory.startswith("s3://"):
    return _orbax_build_kvstore_tspec(directory, name, **kwargs)
  return _gcs_to_s3(_orbax_build_kvstore_tspec("gs://" + directory.removeprefix("s3://"), name, **kwargs))


def install() -> None:
  """Makes Orbax write and read `s3://` checkpoints through tensorstore's S3 driver (idempotent).

  Orbax's serialisation modules call `tensorstore_utils.build_kvstore_tspec` through the module, so replacing that
  one attribute reaches every caller (array writes and reads, OCDBT merges).
  """
  tensorstore_utils.build_kvstore_tspec = _build_kvstore_tspec
