"""KITTI-STEP -> dataset format: a synthetic 2-sequence tree (DeepLab2's R = semantic, G * 256 + B = instance PNGs),
metadata (Cityscapes train ids, only person and car as things), per-pixel categories and instances, track ids kept
across frames, crowd modes, per-file failures, resume and S3 output."""

import pathlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import validate
from panoptic_jax.data.convert import __main__ as cli
from panoptic_jax.data.convert import kitti_step
from panoptic_jax.data.dataset import Dataset

H, W = 24, 40
CITYSCAPES = (  # (name, colour) in train-id order, cityscapesScripts helpers/labels.py.
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)), ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)), ("pole", (153, 153, 153)), ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)), ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)), ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)), ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
)
SEQUENCES = {"0002": ("000000", "000001", "000002"), "0006": ("000000", "000001")}


def _step_map(shift: int) -> tuple[np.ndarray, np.ndarray]:
  """(semantic, instance) [H, W] of one frame; the objects move right by `shift` pixels."""
  semantic = np.full((H, W), 255, np.int32)
  instance = np.zeros((H, W), np.int32)
  semantic[:4] = 0  # road
  semantic[4:8, :20] = 10  # sky
  semantic[4:8, 20:] = 12  # rider: a Cityscapes thing without instances in KITTI-STEP -> stuff
  semantic[8:14, 0 + shift:8 + shift] = 13  # car, track 3
  instance[8:14, 0 + shift:8 + shift] = 3
  semantic[8:14, 10 + shift:18 + shift] = 13  # car, track 7
  instance[8:14, 10 + shift:18 + shift] = 7
  semantic[8:14, 30:] = 13  # car pixels without a track: crowd
  semantic[14:20, 0:6] = 11  # person, track 1
  instance[14:20, 0:6] = 1
  semantic[14:20, 6:12] = 11  # person, track 260 (G = 1, B = 4)
  instance[14:20, 6:12] = 260
  semantic[14:20, 12:30] = 18  # bicycle (stuff here)
  instance[20:, :10] = 5  # void pixels with an id stay void
  return semantic, instance


def _write_png(path: pathlib.Path, semantic: np.ndarray, instance: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  rgb = np.dstack([semantic, instance // 256, instance % 256]).astype(np.uint8)
  Image.fromarray(rgb).save(path)


def _write_tree(root: pathlib.Path, split: str = "val") -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """images/<split>/<seq>/<frame>.png and panoptic_maps/<split>/<seq>/<frame>.png; returns {stem: (sem, inst)}."""
  maps = {}
  for sequence, frames in SEQUENCES.items():
    for k, frame in enumerate(frames):
      image = root / "images" / split / sequence / f"{frame}.png"
      image.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.full((H, W, 3), (k * 40, int(sequence), 7), np.uint8)).save(image)
      maps[f"{sequence}_{frame}"] = _step_map(shift=k)
      _write_png(root / "panoptic_maps" / split / sequence / f"{frame}.png", *maps[f"{sequence}_{frame}"])
  return maps


def _expected(semantic: np.ndarray, instance: np.ndarray, crowd: str) -> np.ndarray:
  """The canonical map as decoding gives it: tracks renumbered 1..K per class in increasing track id."""
  out = np.full((H, W), fmt.VOID, np.int32)
  for c in set(np.unique(semantic).tolist()) - {255}:
    mask = semantic == c
    if c not in (11, 13):
      out[mask] = c * 1000
      continue
    ids = sorted(set(np.unique(instance[mask]).tolist()) - ({0} if crowd == "ignore" else set()))
    for rank, i in enumerate(ids, 1):
      out[mask & (instance == i)] = c * 1000 + rank
  return out


def test_metadata_is_cityscapes_with_person_and_car_as_things():
  info = kitti_step.dataset_info()
  assert list(zip(info.categories, info.colors)) == list(CITYSCAPES)
  assert [n for n, t in zip(info.categories, info.is_thing) if t] == ["person", "car"]
  assert fmt.parse_metadata(fmt.metadata_yaml(info)) == info  # Unique, non-black colours.


@pytest.mark.parametrize("crowd", ["ignore", "keep"])
def test_converts_every_pixel(tmp_path, crowd):
  maps = _write_tree(tmp_path / "step")
  out = tmp_path / "out"
  summary = kitti_step.convert(str(tmp_path / "step"), "val", str(out), crowd=crowd, progress=False)
  assert summary.ok and not summary.unpaired, summary.text()
  assert sorted(summary.converted) == sorted(maps) == [
      "0002_000000", "0002_000001", "0002_000002", "0006_000000", "0006_000001"]
  # Per frame: 4 tracks; stuff road, sky, rider, bicycle; one car crowd region.
  crowd_stat = "crowd kept" if crowd == "keep" else "crowd to void"
  assert summary.stats == {"thing instances": 20, "stuff segments": 20, crowd_stat: 5}
  assert (out / "images" / "0006_000001.png").read_bytes() == (
      tmp_path / "step" / "images" / "val" / "0006" / "000001.png").read_bytes()

  dataset = Dataset.open(str(out))
  assert dataset.info == kitti_step.dataset_info()
  assert dataset.names == sorted(maps) and not dataset.unpaired_images
  for i, name in enumerate(dataset.names):
    np.testing.assert_array_equal(dataset.read_panoptic(i), _expected(*maps[name], crowd), err_msg=name)
  report = validate.validate_dataset(str(out), workers=1, progress=False)
  assert report["valid"] and report["annotated_images"] == 5, report["errors"]
  assert {c["name"]: c["kind"] for c in report["categories"] if c["segments"]} == {
      "road": "stuff", "sky": "stuff", "rider": "stuff", "bicycle": "stuff", "person": "thing", "car": "thing"}

  # The on-disk instance ids are the track ids, the same in every frame of a sequence.
  for name, (semantic, instance) in maps.items():
    pages = tifffile.TiffFile(out / "panoptic_maps" / f"{name}.tif").pages
    ids = pages[1].asarray().astype(np.int64)
    things = np.isin(semantic, (11, 13)) & (instance != 0)
    np.testing.assert_array_equal(ids[things], instance[things])
    assert set(np.unique(ids[things]).tolist()) == {1, 3, 7, 260}


def test_failures_are_named_and_a_rerun_skips_the_done(tmp_path):
  root = tmp_path / "step"
  maps = _write_tree(root, "train")
  pan = root / "panoptic_maps" / "train"
  (pan / "0002" / "000000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # Undecodable.
  _write_png(pan / "0002" / "000001.png", *(a[:12] for a in maps["0002_000001"]))  # Smaller than its image.
  semantic, instance = maps["0002_000002"]
  _write_png(pan / "0002" / "000002.png", np.where(semantic == 10, 40, semantic), instance)  # 40: no train id.
  semantic, instance = maps["0006_000000"]
  _write_png(pan / "0006" / "000000.png", semantic, np.where(semantic == 0, 9, instance))  # An id on road.
  _write_png(pan / "0006" / "000009.png", *maps["0006_000001"])  # No image.
  Image.new("RGB", (W, H)).save(root / "images" / "train" / "0006" / "000005.png")  # No map.

  first = kitti_step.convert(str(root), "train", str(tmp_path / "out"), workers=2, progress=False)
  assert first.converted == ["0006_000001"]
  assert first.unpaired == [("0006/000005.png", "image without panoptic map")]
  reasons = dict(first.failed)
  assert sorted(reasons) == ["0002_000000", "0002_000001", "0002_000002", "0006/000009.png", "0006_000000"]
  assert "0002/000000.png: cannot decode as PNG" in reasons["0002_000000"]
  assert "is 24x40 but its annotation is 12x40" in reasons["0002_000001"]
  assert "semantic ids (R) 40 (80 px) are not train ids" in reasons["0002_000002"]
  assert "instance ids on classes without instances: road (160 px)" in reasons["0006_000000"]
  assert "no image 0006/000009" in reasons["0006/000009.png"]
  assert "failed 5, unpaired 1" in first.text()

  _write_png(pan / "0002" / "000001.png", *maps["0002_000001"])  # Repaired.
  again = kitti_step.convert(str(root), "train", str(tmp_path / "out"), progress=False)
  assert again.skipped == ["0006_000001"] and again.converted == ["0002_000001"]
  assert len(again.failed) == 4
  assert Dataset.open(str(tmp_path / "out")).names == ["0002_000001", "0006_000001"]


def test_bad_arguments(tmp_path):
  _write_tree(tmp_path / "step")
  (tmp_path / "step" / "images" / "test" / "0000").mkdir(parents=True)
  with pytest.raises(ValueError, match="panoptic maps folder .*test does not exist"):
    kitti_step.convert(str(tmp_path / "step"), "test", str(tmp_path / "out"), progress=False)
  with pytest.raises(ValueError, match="crowd"):
    kitti_step.convert(str(tmp_path / "step"), "val", str(tmp_path / "out"), crowd="drop", progress=False)
  # A non-standard layout: the folders passed directly.
  summary = kitti_step.convert("/nonexistent", "val", str(tmp_path / "out"), progress=False,
                               images=str(tmp_path / "step" / "images" / "val"),
                               panoptic_maps=str(tmp_path / "step" / "panoptic_maps" / "val"))
  assert summary.ok and len(summary.converted) == 5


def test_resume_on_s3(tmp_path, s3_bucket, s3_server):
  maps = _write_tree(tmp_path / "step")
  location = f"s3://{s3_bucket}/kitti_step/val"
  first = kitti_step.convert(str(tmp_path / "step"), "val", location, endpoint_url=s3_server.endpoint_url,
                             progress=False)
  again = kitti_step.convert(str(tmp_path / "step"), "val", location, endpoint_url=s3_server.endpoint_url,
                             progress=False)
  assert len(first.converted) == 5 and not again.converted and sorted(again.skipped) == sorted(first.converted)
  dataset = Dataset.open(location, s3_server.endpoint_url)
  assert dataset.info == kitti_step.dataset_info() and dataset.names == sorted(maps)
  np.testing.assert_array_equal(dataset.read_panoptic(0), _expected(*maps[dataset.names[0]], "ignore"))


def test_the_command(tmp_path, capsys):
  _write_tree(tmp_path / "step")
  code = cli.main(["kitti_step", "--root", str(tmp_path / "step"), "--split", "val", "--out", str(tmp_path / "out"),
                   "--workers", "1", "--no_progress"])
  assert code == 0 and "failed 0" in capsys.readouterr().out
  assert (tmp_path / "out" / "metadata.yaml").exists()
  assert len(list((tmp_path / "out" / "panoptic_maps").iterdir())) == sum(len(f) for f in SEQUENCES.values())
