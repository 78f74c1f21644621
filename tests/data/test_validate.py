"""python -m panoptic_jax.data.validate: validation and summary of a dataset."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import ImageFile

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import validate as validate_lib
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.storage import open_storage

INFO = fmt.DatasetInfo(("person", "car", "sky"), ((220, 20, 60), (0, 0, 142), (70, 130, 180)), (True, True, False))


def _panoptic(hw, seed):
  panoptic = np.full(hw, 2 * INFO.label_divisor, np.int32)  # sky
  panoptic[:2, :2] = fmt.VOID
  for k in range(seed + 1):  # Disjoint boxes, canonical instance numbers.
    panoptic[4:8, 4 * k:4 * k + 4] = (k % 2) * INFO.label_divisor + k // 2 + 1
  return panoptic


def _write(storage):
  storage.write_bytes("metadata.yaml", fmt.metadata_yaml(INFO).encode())
  maps = {}
  for i, (stem, downscale) in enumerate([("a", 1), ("b", 2), ("c", 1)]):
    maps[stem] = _panoptic((16, 24), i)
    storage.write_bytes(f"images/{stem}.png", fmt.encode_image(np.zeros((16, 24, 3), np.uint8), ".png"))
    storage.write_bytes(f"panoptic_maps/{stem}.tif", fmt.encode_annotation(maps[stem], INFO, downscale))
  storage.write_bytes("images/lonely.jpg", fmt.encode_image(np.zeros((8, 8, 3), np.uint8), ".jpg"))
  storage.write_bytes("panoptic_maps/orphan.tif", fmt.encode_annotation(_panoptic((16, 24), 0), INFO))
  storage.write_bytes("images/sub/ignored.png", b"not even an image")
  return maps


def _expected_categories(location):
  ds = Dataset.open(location)
  maps = [ds.read_panoptic(i) for i in range(len(ds))]  # At image size, as validate counts them.
  out = []
  for c, name in enumerate(INFO.categories):
    values = [np.unique(m[(m // INFO.label_divisor == c) & (m != fmt.VOID)]) for m in maps]
    pixels = sum(int(((m // INFO.label_divisor == c) & (m != fmt.VOID)).sum()) for m in maps)
    out.append({"name": name, "kind": "thing" if INFO.is_thing[c] else "stuff", "color": list(INFO.colors[c]),
                "segments": sum(len(v) for v in values), "pixels": pixels,
                "images": sum(len(v) > 0 for v in values)})
  return out, sum(int((m == fmt.VOID).sum()) for m in maps)


def _check_summary(summary, location):
  assert summary["valid"] and summary["errors"] == []
  assert (summary["images"], summary["annotations"], summary["annotated_images"]) == (4, 4, 3)
  assert summary["unpaired_images"] == {"count": 1, "names": ["lonely.jpg"]}
  assert summary["unpaired_annotations"] == {"count": 1, "names": ["orphan.tif"]}
  assert summary["annotation_scales"] == {"1x": 2, "2x": 1}
  assert summary["id_dtypes"] == {"uint8": 4}
  categories, void = _expected_categories(location)
  assert summary["categories"] == categories and summary["void_pixels"] == void
  assert [c["segments"] for c in categories] == [1 + 1 + 2, 1 + 1, 3]  # Instances per image: 1, 2, 3; sky: 1 each.


def test_valid_local_dataset(tmp_path, capsys):
  _write(open_storage(tmp_path / "ds"))
  code = validate_lib.main([str(tmp_path / "ds"), "--json", str(tmp_path / "s.json"), "--workers", "0"])
  out = capsys.readouterr().out
  assert code == 0, out
  _check_summary(json.loads((tmp_path / "s.json").read_text()), tmp_path / "ds")
  assert "annotation scales: 1x: 2, 2x: 1" in out and "OK: every file is valid" in out
  assert "images without annotation: 1 (lonely.jpg)" in out and "thing" in out and "stuff" in out


def test_broken_files_give_exit_1_and_are_named(tmp_path, capsys):
  storage = open_storage(tmp_path)
  _write(storage)
  storage.write_bytes("panoptic_maps/b.tif", b"garbage")
  bad_color = fmt.encode_annotation(np.zeros((16, 24), np.int32), fmt.DatasetInfo(("x",), ((1, 2, 3),), (False,)))
  storage.write_bytes("panoptic_maps/c.tif", bad_color)
  storage.write_bytes("images/lonely.jpg", b"not a jpeg")
  code = validate_lib.main([str(tmp_path), "--json", str(tmp_path / "s.json"), "--workers", "0", "--no_progress"])
  out = capsys.readouterr().out
  assert code == 1
  assert f"{tmp_path}/panoptic_maps/b.tif: cannot decode as TIFF" in out
  assert f"{tmp_path}/panoptic_maps/c.tif: 1 colours are not in the metadata palette: [1, 2, 3]" in out
  assert f"{tmp_path}/images/lonely.jpg: cannot decode as an image" in out
  summary = json.loads((tmp_path / "s.json").read_text())
  assert not summary["valid"] and sorted(e["file"].rsplit("/", 1)[-1] for e in summary["errors"]) == [
      "b.tif", "c.tif", "lonely.jpg"]
  assert summary["annotation_scales"] == {"1x": 1}  # Only a.tif decoded.


def test_missing_location_gives_exit_1(tmp_path, capsys):
  assert validate_lib.main([str(tmp_path / "nope"), "--workers", "0"]) == 1
  assert "does not exist" in capsys.readouterr().out


def test_s3_dataset_with_worker_processes(s3_root, tmp_path):
  location = f"s3://{s3_root}/ds"
  _write(open_storage(location))
  # A real command line (the environment points it at the server), with worker threads.
  result = subprocess.run([sys.executable, "-m", "panoptic_jax.data.validate", location, "--json",
                           str(tmp_path / "s.json"), "--workers", "3"], capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "validate: 100%" in result.stderr  # The progress bar.
  _check_summary(json.loads((tmp_path / "s.json").read_text()), location)


def test_worker_processes(tmp_path):
  """--processes: spawned workers unpickle the storage (about 2 s each to start on a small machine)."""
  _write(open_storage(tmp_path))
  summary = validate_lib.validate_dataset(str(tmp_path), workers=2, progress=False, processes=True)
  _check_summary(summary, tmp_path)


def _truncated_jpeg() -> bytes:
  """A valid JPEG of noise cut in half: its header (and size) reads, its pixels do not decode."""
  data = fmt.encode_image(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8), ".jpg")
  return data[:len(data) // 2]


def test_truncated_jpeg_is_an_error_and_headers_only_does_not_say_ok(tmp_path, capsys):
  storage = open_storage(tmp_path)
  _write(storage)
  storage.write_bytes("images/lonely.jpg", _truncated_jpeg())
  code = validate_lib.main([str(tmp_path), "--json", str(tmp_path / "s.json"), "--workers", "0", "--no_progress"])
  out = capsys.readouterr().out
  assert code == 1, out
  assert f"{tmp_path}/images/lonely.jpg: cannot decode as an image: OSError: image file is truncated" in out
  summary = json.loads((tmp_path / "s.json").read_text())
  assert summary["images_decoded"] and [e["file"] for e in summary["errors"]] == [f"{tmp_path}/images/lonely.jpg"]

  code = validate_lib.main([str(tmp_path), "--json", str(tmp_path / "h.json"), "--workers", "0", "--no_progress",
                            "--headers_only"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "every file is valid" not in out and "images were only header-checked (--headers_only)" in out
  assert json.loads((tmp_path / "h.json").read_text())["images_decoded"] is False


def test_pillow_accepting_truncated_images_is_refused(tmp_path, monkeypatch):
  _write(open_storage(tmp_path))
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES is True"):
    validate_lib.validate_dataset(str(tmp_path), workers=0, progress=False)
