"""Runs an exported model (`python -m panoptic_jax.export`) with jax and numpy: no flax, optax, orbax or model code.

    python -m panoptic_jax.inference.serving --model ARTIFACT --images LOCATION --out OUT [--batch_size B]

writes what `python -m panoptic_jax.predict` writes (the same maps for the same images: both prepare images and
restore maps with `predictor.py`). In Python:

    loaded = serving.load("exports/demo")             # manifest, weights and the function for this platform
    outputs = loaded.network(crops)                   # uint8 [B, h, w, 3] -> the map at the crop and segment scores
    Predictor.from_export("exports/demo")(image)      # any image -> PanopticResult (predictor.py)

An artifact is checked before use: its format version must be this one's, and it must hold a lowering for this
machine's platform; each mismatch is one error naming the artifact, what it holds and what is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
from typing import Any, Callable

import jax
import numpy as np

import panoptic_jax
from panoptic_jax.data.storage import Storage, open_storage
from panoptic_jax.errors import UserError
from panoptic_jax.inference.spec import ModelSpec

# The artifact's layout (export.py writes it; that module needs flax, this one must not import it).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(UserError, ValueError):
  """An artifact that is missing, incomplete, of another format version, or without this platform's lowering."""


@dataclasses.dataclass(frozen=True)
class LoadedArtifact:
  """An exported model ready to run.

  Attributes:
    manifest: manifest.json as written by the export.
    spec: categories, inference size, merge thresholds.
    network: uint8 [B, h, w, 3] crops -> predict.predict's outputs (jitted; one compilation per batch size).
  """

  manifest: dict[str, Any]
  spec: ModelSpec
  network: Callable[[np.ndarray], dict]


def _read_manifest(folder: Storage) -> dict[str, Any]:
  path = folder.url(MANIFEST)
  if not folder.exists(MANIFEST):
    raise ArtifactError(f"{folder.url()}: not an exported model (no {MANIFEST}); write one with "
                        "python -m panoptic_jax.export --workdir RUN --out ARTIFACT")
  try:
    manifest = json.loads(folder.read_bytes(MANIFEST))
  except ValueError as e:
    raise ArtifactError(f"{path}: not valid JSON ({e})") from None
  version = manifest.get("format_version") if isinstance(manifest, dict) else None
  if version != FORMAT_VERSION:
    raise ArtifactError(f"{path}: artifact format version {version!r} (written by panoptic_jax "
                        f"{manifest.get('panoptic_jax_version', '?') if isinstance(manifest, dict) else '?'}), but "
                        f"this panoptic_jax {panoptic_jax.__version__} reads version {FORMAT_VERSION}; export the "
                        "model again with this version")
  return manifest


def load(artifact: str, device: jax.Device | None = None) -> LoadedArtifact:
  """Reads ARTIFACT and prepares its function for `device` (default: the first local device).

  Raises:
    ArtifactError: see the module docstring.
  """
  folder = open_storage(artifact)
  manifest = _read_manifest(folder)
  device = device or jax.local_devices()[0]
  platform = "cuda" if device.platform == "gpu" else device.platform
  if platform not in manifest["platforms"]:
    raise ArtifactError(f"{folder.url()}: exported for {', '.join(manifest['platforms'])}, not for this machine's "
                        f"{platform}; export again with --platforms including {platform}")
  try:
    exported = jax.export.deserialize(bytearray(folder.read_bytes(manifest["function"]["file"])))
    with np.load(io.BytesIO(folder.read_bytes(manifest["weights"]["file"]))) as stored:
      weights = {name: stored[name] for name in stored.files}
  except (OSError, ValueError, KeyError) as e:
    raise ArtifactError(f"{folder.url()}: cannot read the exported function or weights ({type(e).__name__}: {e}); it was "
                        f"written by jax {manifest.get('jax_version')}, this is jax {jax.__version__}") from None
  weights = jax.device_put(weights, device)
  call = jax.jit(exported.call)
  return LoadedArtifact(manifest, ModelSpec.from_json(manifest["spec"]), lambda images: call(weights, images))


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m panoptic_jax.inference.serving", description=__doc__.split("\n")[0])
  parser.add_argument("--model", required=True, help="the artifact folder written by python -m panoptic_jax.export")
  from panoptic_jax.inference import batch_predict  # The options every prediction command shares.
  batch_predict.add_arguments(parser)
  return parser


def main(argv: list[str] | None = None) -> int:
  from panoptic_jax.inference import batch_predict
  from panoptic_jax.inference.predictor import Predictor
  args = _parser().parse_args(argv)
  batch_predict.initialise(args)
  predictor = Predictor.from_export(args.model, batch_size=args.batch_size or 1)
  return batch_predict.run_command(predictor, args)


if __name__ == "__main__":
  from panoptic_jax import cli
  cli.run(main, malloc_tunables=True)
