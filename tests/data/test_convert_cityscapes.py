"""Cityscapes -> dataset format: the panoptic layout against DeepLab2's own converter output, a synthetic gtFine
instanceIds layout, metadata, pairing, crowd modes, failures, resume and S3 output."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import __main__ as cli
from panoptic_jax.data.convert import cityscapes
from panoptic_jax.data.storage import open_storage

OFFICIAL = {  # name: (train id, colour), cityscapesScripts helpers/labels.py
    "road": (0, (128, 64, 128)), "sidewalk": (1, (244, 35, 232)), "building": (2, (70, 70, 70)),
    "wall": (3, (102, 102, 156)), "fence": (4, (190, 153, 153)), "pole": (5, (153, 153, 153)),
    "traffic light": (6, (250, 170, 30)), "traffic sign": (7, (220, 220, 0)), "vegetation": (8, (107, 142, 35)),
    "terrain": (9, (152, 251, 152)), "sky": (10, (70, 130, 180)), "person": (11, (220, 20, 60)),
    "rider": (12, (255, 0, 0)), "car": (13, (0, 0, 142)), "truck": (14, (0, 0, 70)), "bus": (15, (0, 60, 100)),
    "train": (16, (0, 80, 100)), "motorcycle": (17, (0, 0, 230)), "bicycle": (18, (119, 11, 32)),
}


def _load(out: pathlib.Path):
  info = fmt.parse_metadata((out / "metadata.yaml").read_text())
  maps = {p.stem: fmt.decode_annotation(p.read_bytes(), info, where=str(p)) for p in (out / "panoptic_maps").iterdir()}
  return info, maps


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
  """Whether two label maps split the image into the same segments (values may differ)."""
  pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
  return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def test_metadata_is_the_official_table():
  info = cityscapes.dataset_info()
  assert [(n, (i, c)) for i, (n, c) in enumerate(zip(info.categories, info.colors))] == list(OFFICIAL.items())
  assert [n for n, t in zip(info.categories, info.is_thing) if t] == [
      "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
  assert fmt.parse_metadata(fmt.metadata_yaml(info)) == info  # Unique, non-black colours.


@pytest.mark.parametrize("crowd", ["ignore", "keep"])
def test_panoptic_layout_matches_deeplab2(fixtures, tmp_path, crowd):
  root = fixtures / "deeplab2_cityscapes_dummy"
  out = tmp_path / "out"
  summary = cityscapes.convert(str(root), "dummy", str(out), images=str(root / "leftImg8bit"), crowd=crowd,
                               progress=False)
  assert summary.ok and summary.converted == ["dummy_000000_000000"], summary.text()
  assert summary.stats["thing instances"] == 5 and summary.stats["stuff segments"] == 4
  assert (out / "images" / "dummy_000000_000000.png").read_bytes() == (
      root / "leftImg8bit" / "dummy_000000_000000_leftImg8bit.png").read_bytes()
  info, maps = _load(out)
  pan = maps["dummy_000000_000000"]
  # DeepLab2's build_cityscapes_data output (crowd kept): RGB-coded train_id * 1000 + instance, 255000 = void.
  rgb = np.asarray(Image.open(root / "dummy_gt_for_vps.png")).astype(np.int64)
  golden = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
  crowd_mask = golden == 13000  # The car crowd (id 26, 6178 px).
  assert crowd_mask.sum() == 6178
  if crowd == "ignore":
    golden = np.where(crowd_mask, 255000, golden)
  assert np.array_equal(pan == fmt.VOID, golden == 255000)
  valid = pan != fmt.VOID
  assert np.array_equal(pan[valid] // 1000, golden[valid] // 1000)  # Same train ids ...
  assert _same_partition(pan, golden)  # ... and the same segments.


def _write_instance_ids_layout(root: pathlib.Path) -> np.ndarray:
  """A 2-city gtFine/leftImg8bit train split; returns the instanceIds map of aachen_000000_000019."""
  ids = np.zeros((40, 60), np.uint16)  # 0 = unlabeled (void).
  ids[:10] = 7  # road
  ids[10:20, :20] = 26  # a car crowd group
  ids[10:20, 20:30] = 26002  # car instances, out of order on purpose
  ids[10:20, 30:40] = 26001
  ids[20:30, :30] = 24000  # person
  ids[20:30, 30:] = 29000  # caravan: ignoreInEval -> void
  ids[30:, :30] = 4  # static: void
  ids[30:, 30:] = 23  # sky
  for city, stem in (("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")):
    (root / "gtFine" / "train" / city).mkdir(parents=True)
    (root / "leftImg8bit" / "train" / city).mkdir(parents=True)
    Image.fromarray(ids).save(root / "gtFine" / "train" / city / f"{stem}_gtFine_instanceIds.png")
    Image.new("RGB", (60, 40), (1, 2, 3)).save(root / "leftImg8bit" / "train" / city / f"{stem}_leftImg8bit.png")
  Image.new("RGB", (60, 40)).save(root / "leftImg8bit" / "train" / "bochum" / "bochum_000001_000001_leftImg8bit.png")
  return ids


@pytest.mark.parametrize("crowd", ["ignore", "keep"])
def test_instance_ids_layout(tmp_path, crowd):
  ids = _write_instance_ids_layout(tmp_path / "cs")
  out = tmp_path / "out"
  summary = cityscapes.convert(str(tmp_path / "cs"), "train", str(out), crowd=crowd, progress=False)
  assert sorted(summary.converted) == ["aachen_000000_000019", "bochum_000000_000313"], summary.text()
  assert summary.unpaired == [("bochum_000001_000001_leftImg8bit.png", "image without annotation")]
  assert sorted(p.name for p in (out / "images").iterdir()) == ["aachen_000000_000019.png", "bochum_000000_000313.png"]
  info, maps = _load(out)
  pan = maps["aachen_000000_000019"]
  keep = crowd == "keep"
  expected = np.full(ids.shape, fmt.VOID, np.int32)
  expected[ids == 7] = 0
  expected[ids == 23] = 10 * 1000
  expected[ids == 24000] = 11 * 1000 + 1
  expected[ids == 26] = 13 * 1000 + 1 if keep else fmt.VOID
  expected[ids == 26001] = 13 * 1000 + 1 + keep  # Instances keep their source order.
  expected[ids == 26002] = 13 * 1000 + 2 + keep
  np.testing.assert_array_equal(pan, expected)


def test_instance_ids_bad_inputs_fail_their_files(tmp_path, capsys):
  root = tmp_path / "cs"
  _write_instance_ids_layout(root)
  bad = root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_instanceIds.png"
  Image.fromarray(np.full((40, 60), 40, np.uint16)).save(bad)  # Label id 40 does not exist.
  orphan = root / "gtFine" / "train" / "bochum" / "bochum_000009_000009_gtFine_instanceIds.png"
  shutil.copy(bad, orphan)
  small = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019_gtFine_instanceIds.png"
  Image.fromarray(np.full((20, 30), 7, np.uint16)).save(small)  # Annotation smaller than its image.
  code = cli.main(["cityscapes", "--root", str(root), "--split", "train", "--out", str(tmp_path / "out"),
                   "--workers", "2", "--no_progress"])
  printed = capsys.readouterr().out
  assert code == 1 and "converted 0, skipped 0 (already done), failed 3" in printed
  assert "label id 40" in printed and "no image bochum_000009_000009_leftImg8bit.png" in printed
  assert "is 40x60 but its annotation is 20x30" in printed


def test_resume_and_s3(tmp_path, s3_bucket, s3_server):
  _write_instance_ids_layout(tmp_path / "cs")
  location = f"s3://{s3_bucket}/cityscapes/train"
  first = cityscapes.convert(str(tmp_path / "cs"), "train", location, endpoint_url=s3_server.endpoint_url,
                             progress=False)
  again = cityscapes.convert(str(tmp_path / "cs"), "train", location, endpoint_url=s3_server.endpoint_url,
                             progress=False)
  assert len(first.converted) == 2 and not again.converted and sorted(again.skipped) == sorted(first.converted)
  storage = open_storage(location, s3_server.endpoint_url)
  info = fmt.parse_metadata(storage.read_bytes("metadata.yaml").decode())
  assert info == cityscapes.dataset_info()
  pan = fmt.decode_annotation(storage.read_bytes("panoptic_maps/aachen_000000_000019.tif"), info)
  assert pan.shape == (40, 60)


def test_panoptic_layout_with_categories_and_label_ids(fixtures, tmp_path):
  """A JSON made without --use-train-id (label ids, categories listed) converts to the same maps."""
  root = fixtures / "deeplab2_cityscapes_dummy"
  data = json.loads((root / "gtFine" / "cityscapes_panoptic_dummy_trainId.json").read_text())
  label_id = {13: 26, 8: 21, 10: 23, 2: 11, 0: 7}
  for s in data["annotations"][0]["segments_info"]:
    s["category_id"] = label_id[s["category_id"]]
  data["categories"] = [{"id": 26, "name": "car"}, {"id": 21, "name": "vegetation"}, {"id": 23, "name": "sky"},
                        {"id": 11, "name": "building"}, {"id": 7, "name": "road"}]
  (tmp_path / "cityscapes_panoptic_dummy.json").write_text(json.dumps(data))
  summary = cityscapes.convert(str(root), "dummy", str(tmp_path / "a"), images=str(root / "leftImg8bit"),
                               panoptic_json=str(tmp_path / "cityscapes_panoptic_dummy.json"),
                               panoptic_dir=str(root / "gtFine" / "cityscapes_panoptic_dummy_trainId"), progress=False)
  reference = cityscapes.convert(str(root), "dummy", str(tmp_path / "b"), images=str(root / "leftImg8bit"),
                                 progress=False)
  assert summary.ok and reference.ok
  assert (tmp_path / "a" / "panoptic_maps" / "dummy_000000_000000.tif").read_bytes() == (
      tmp_path / "b" / "panoptic_maps" / "dummy_000000_000000.tif").read_bytes()
