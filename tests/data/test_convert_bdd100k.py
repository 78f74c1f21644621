"""BDD100K pan_seg bitmasks -> dataset format: the 40-class table and its colours, per-pixel categories and instances,
crowd / ignore bits in both modes, stuff merging, pairing, per-file failures, resume, a custom layout and S3 output."""

import pathlib

import numpy as np
import pytest
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import __main__ as cli
from panoptic_jax.data.convert import bdd100k
from panoptic_jax.data.storage import open_storage

# doc/source/format.rst "Panoptic Segmentation": ids 1..40 (0 = unlabeled); 1-30 stuff, 31-40 things.
NAMES = ("dynamic", "ego vehicle", "ground", "static", "parking", "rail track", "road", "sidewalk", "bridge",
         "building", "fence", "garage", "guard rail", "tunnel", "wall", "banner", "billboard", "lane divider",
         "parking sign", "pole", "polegroup", "street light", "traffic cone", "traffic device", "traffic light",
         "traffic sign", "traffic sign frame", "terrain", "vegetation", "sky", "person", "rider", "bicycle", "bus",
         "car", "caravan", "motorcycle", "trailer", "train", "truck")
CITYSCAPES_COLORS = {  # bdd100k/label/label.py, the classes with a train id: they keep their colours.
    "road": (128, 64, 128), "sidewalk": (244, 35, 232), "building": (70, 70, 70), "wall": (102, 102, 156),
    "fence": (190, 153, 153), "pole": (153, 153, 153), "traffic light": (250, 170, 30), "traffic sign": (220, 220, 0),
    "vegetation": (107, 142, 35), "terrain": (152, 251, 152), "sky": (70, 130, 180), "person": (220, 20, 60),
    "rider": (255, 0, 0), "car": (0, 0, 142), "truck": (0, 0, 70), "bus": (0, 60, 100), "train": (0, 80, 100),
    "motorcycle": (0, 0, 230), "bicycle": (119, 11, 32)}
OTHER_COLORS = {"dynamic": (111, 74, 0), "ground": (81, 0, 81), "parking": (250, 170, 160), "caravan": (0, 0, 90),
                "trailer": (0, 0, 110), "traffic sign frame": (250, 170, 250), "lane divider": (255, 165, 0)}
DIV = 1000
ROAD, SKY, EGO, PERSON, BUS, CAR = (NAMES.index(n) for n in ("road", "sky", "ego vehicle", "person", "bus", "car"))
CROWD, IGNORE, TRUNCATED_OCCLUDED = 2, 1, 12  # G bits.

STEM = "b1c66a42-6f7d68ca"


def _paint(bitmask, rows, cols, category, instance, attributes=0):
  bitmask[rows, cols] = (category, attributes, instance >> 8, instance & 255)


def _main_bitmask() -> np.ndarray:
  """40x60 RGBA: two road segments, sky, ego vehicle, 4 cars and a person, a crowd car, an ignored person, unlabeled."""
  b = np.zeros((40, 60, 4), np.uint8)  # (0, 0, 0, 0): unlabeled.
  _paint(b, slice(0, 10), slice(0, 30), 7, 7)  # road, the toolkit's stuff id (= category id)
  _paint(b, slice(0, 10), slice(30, 60), 7, 300)  # road again under another id (> 255: B is used): merges
  _paint(b, slice(10, 20), slice(0, 15), 35, 33)  # car, higher id first on purpose
  _paint(b, slice(10, 20), slice(15, 30), 35, 31)  # car
  _paint(b, slice(10, 20), slice(30, 45), 31, 32)  # person
  _paint(b, slice(10, 20), slice(45, 60), 35, 34, CROWD)  # car crowd
  _paint(b, slice(20, 30), slice(0, 20), 35, 36, TRUNCATED_OCCLUDED)  # car; these bits change nothing
  _paint(b, slice(20, 30), slice(20, 40), 31, 35, IGNORE)  # person flagged ignore
  _paint(b, slice(30, 40), slice(0, 30), 30, 30)  # sky
  _paint(b, slice(30, 40), slice(30, 60), 2, 2)  # ego vehicle
  return b


def _expected(crowd: str) -> np.ndarray:
  keep = crowd == "keep"
  e = np.full((40, 60), fmt.VOID, np.int32)
  e[0:10] = ROAD * DIV
  e[10:20, 0:15] = CAR * DIV + 2 + keep  # Instances numbered in bitmask-id order: 31, 33, 36 (crowd: id 0, first).
  e[10:20, 15:30] = CAR * DIV + 1 + keep
  e[10:20, 30:45] = PERSON * DIV + 1 + keep
  e[20:30, 0:20] = CAR * DIV + 3 + keep
  if keep:
    e[10:20, 45:60] = CAR * DIV + 1
    e[20:30, 20:40] = PERSON * DIV + 1
  e[30:40, 0:30] = SKY * DIV
  e[30:40, 30:60] = EGO * DIV
  return e


def _write_tree(root: pathlib.Path, split: str = "val") -> None:
  """images/10k/<split> (3 images, one without bitmask) and labels/pan_seg/bitmasks/<split> (2 bitmasks)."""
  images = root / "images" / "10k" / split
  masks = root / "labels" / "pan_seg" / "bitmasks" / split
  images.mkdir(parents=True)
  masks.mkdir(parents=True)
  Image.fromarray(_main_bitmask(), "RGBA").save(masks / f"{STEM}.png")
  second = np.zeros((40, 60, 4), np.uint8)
  _paint(second, slice(0, 40), slice(0, 60), 7, 7)
  _paint(second, slice(5, 15), slice(5, 15), 34, 31)  # bus
  _paint(second, slice(30, 40), slice(0, 10), 7, 0)  # Instance id 0 is the background whatever R says: void.
  _paint(second, slice(30, 40), slice(50, 60), 0, 5)  # Unlabeled (category 0) under an instance id: void.
  Image.fromarray(second, "RGBA").save(masks / "c2.png")
  for stem in (STEM, "c2", "no-label"):
    Image.new("RGB", (60, 40), (90, 120, 30)).save(images / f"{stem}.jpg")


def _load(out: pathlib.Path):
  info = fmt.parse_metadata((out / "metadata.yaml").read_text())
  maps = {p.stem: fmt.decode_annotation(p.read_bytes(), info, where=str(p)) for p in (out / "panoptic_maps").iterdir()}
  return info, maps


def test_metadata_is_the_label_table():
  info = bdd100k.dataset_info()
  assert info.categories == NAMES
  assert [n for n, t in zip(NAMES, info.is_thing) if t] == list(NAMES[30:])
  colors = dict(zip(NAMES, info.colors))
  assert {n: colors[n] for n in CITYSCAPES_COLORS} == CITYSCAPES_COLORS
  assert {n: colors[n] for n in OTHER_COLORS} == OTHER_COLORS
  # label.py repeats person's and pole's colours and gives ego vehicle and static black: those move, visibly apart.
  assert colors["parking sign"] != (220, 20, 60) and colors["polegroup"] != (153, 153, 153)
  assert all(max(colors[n]) > 16 for n in ("ego vehicle", "static"))
  assert fmt.parse_metadata(fmt.metadata_yaml(info)) == info  # Unique, non-black colours.
  assert bdd100k.dataset_info() == info  # Deterministic.


@pytest.mark.parametrize("crowd", ["ignore", "keep"])
def test_pixels_instances_and_crowd(tmp_path, crowd):
  _write_tree(tmp_path / "bdd100k")
  out = tmp_path / "out"
  summary = bdd100k.convert(str(tmp_path / "bdd100k"), "val", str(out), crowd=crowd, progress=False)
  assert summary.ok and sorted(summary.converted) == sorted([STEM, "c2"]), summary.text()
  assert summary.unpaired == [("no-label.jpg", "image without bitmask")]
  assert summary.stats["thing instances"] == 5 and summary.stats["stuff segments"] == 5
  assert summary.stats["ignored-class segments to void"] == 1  # The unlabeled one.
  assert summary.stats[f"crowd {'kept' if crowd == 'keep' else 'to void'}"] == 2  # The crowd car, the ignored person.
  assert sorted(p.name for p in (out / "images").iterdir()) == ["b1c66a42-6f7d68ca.jpg", "c2.jpg"]
  assert (out / "images" / f"{STEM}.jpg").read_bytes() == (
      tmp_path / "bdd100k" / "images" / "10k" / "val" / f"{STEM}.jpg").read_bytes()
  info, maps = _load(out)
  assert info == bdd100k.dataset_info()
  np.testing.assert_array_equal(maps[STEM], _expected(crowd))
  expected_c2 = np.full((40, 60), ROAD * DIV, np.int32)
  expected_c2[5:15, 5:15] = BUS * DIV + 1
  expected_c2[30:40, :10] = expected_c2[30:40, 50:] = fmt.VOID
  np.testing.assert_array_equal(maps["c2"], expected_c2)
  assert f"BDD100K pan_seg val (bitmasks) with --crowd {crowd}" in (out / "metadata.yaml").read_text()


def test_resume_and_a_different_crowd_mode_refused(tmp_path):
  _write_tree(tmp_path / "bdd100k")
  out = tmp_path / "out"
  first = bdd100k.convert(str(tmp_path / "bdd100k"), "val", str(out), progress=False)
  before = {p.name: p.read_bytes() for p in (out / "panoptic_maps").iterdir()}
  again = bdd100k.convert(str(tmp_path / "bdd100k"), "val", str(out), progress=False)
  assert len(first.converted) == 2 and not again.converted and sorted(again.skipped) == sorted(first.converted)
  (out / "panoptic_maps" / "c2.tif").unlink()  # As if interrupted between image and annotation.
  third = bdd100k.convert(str(tmp_path / "bdd100k"), "val", str(out), progress=False)
  assert third.converted == ["c2"] and third.skipped == [STEM]
  assert {p.name: p.read_bytes() for p in (out / "panoptic_maps").iterdir()} == before
  with pytest.raises(ValueError, match="--crowd ignore"):
    bdd100k.convert(str(tmp_path / "bdd100k"), "val", str(out), crowd="keep", progress=False)


def test_bad_bitmasks_fail_their_files_only(tmp_path):
  root = tmp_path / "bdd100k"
  _write_tree(root)
  masks, images = root / "labels" / "pan_seg" / "bitmasks" / "val", root / "images" / "10k" / "val"
  good = _main_bitmask()
  bad = {
      "corrupt": (None, "cannot decode as PNG"),
      "rgb": (good[..., :3], "expected an 8-bit RGBA bitmask PNG"),
      "mixed": (good.copy(), "instance id 31 has 2 (category, attributes) values"),
      "crowd-half": (good.copy(), "instance id 34 has 2 (category, attributes) values"),
      "category-41": (good.copy(), "instance id 30 has category id 41 (R); BDD100K panoptic category ids are 0..40"),
      "small": (good[:20, :30], "is 40x60 but its annotation is 20x30"),
  }
  bad["mixed"][0][10, 15] = (31, 0, 0, 31)  # One pixel of car 31 says person.
  bad["crowd-half"][0][10, 45, 1] = 0  # One pixel of the crowd car lacks the crowd bit.
  bad["category-41"][0][30:40, 0:30, 0] = 41
  for stem, (bitmask, _) in bad.items():
    if bitmask is None:
      (masks / f"{stem}.png").write_bytes((masks / "c2.png").read_bytes()[:100])
    else:
      Image.fromarray(np.ascontiguousarray(bitmask)).save(masks / f"{stem}.png")
    Image.new("RGB", (60, 40)).save(images / f"{stem}.jpg")
  Image.fromarray(good, "RGBA").save(masks / "orphan.png")
  summary = bdd100k.convert(str(root), "val", str(tmp_path / "out"), workers=2, progress=False)
  assert sorted(summary.converted) == sorted([STEM, "c2"]), summary.text()
  reasons = dict(summary.failed)
  assert sorted(reasons) == sorted([*bad, "orphan.png"])
  for stem, (_, message) in bad.items():
    assert message in reasons[stem] and f"/{stem}." in reasons[stem], (stem, reasons[stem])  # Names the file.
  assert "no image orphan.jpg" in reasons["orphan.png"]
  text = summary.text()
  assert "failed 7" in text and all(name in text for name in reasons)
  assert sorted(p.stem for p in (tmp_path / "out" / "panoptic_maps").iterdir()) == sorted([STEM, "c2"])


def test_custom_layout_and_missing_folders(tmp_path):
  _write_tree(tmp_path / "bdd100k", split="train")
  summary = bdd100k.convert(str(tmp_path / "elsewhere"), "train", str(tmp_path / "out"),
                            images=str(tmp_path / "bdd100k" / "images" / "10k" / "train"),
                            bitmasks=str(tmp_path / "bdd100k" / "labels" / "pan_seg" / "bitmasks" / "train"),
                            progress=False)
  assert summary.ok and len(summary.converted) == 2
  with pytest.raises(ValueError, match=r"bitmask folder .*labels/pan_seg/bitmasks/test does not exist"):
    (tmp_path / "bdd100k" / "images" / "10k" / "test").mkdir()
    bdd100k.convert(str(tmp_path / "bdd100k"), "test", str(tmp_path / "out2"), progress=False)
  with pytest.raises(ValueError, match=r"images folder .*images/10k/val does not exist"):
    bdd100k.convert(str(tmp_path / "bdd100k"), "val", str(tmp_path / "out2"), progress=False)
  with pytest.raises(ValueError, match="crowd"):
    bdd100k.convert(str(tmp_path / "bdd100k"), "train", str(tmp_path / "out2"), crowd="drop", progress=False)


def test_s3_output_and_resume(tmp_path, s3_bucket, s3_server):
  _write_tree(tmp_path / "bdd100k")
  location = f"s3://{s3_bucket}/bdd100k/val"
  first = bdd100k.convert(str(tmp_path / "bdd100k"), "val", location, endpoint_url=s3_server.endpoint_url,
                          progress=False)
  again = bdd100k.convert(str(tmp_path / "bdd100k"), "val", location, endpoint_url=s3_server.endpoint_url,
                          progress=False)
  assert len(first.converted) == 2 and not again.converted and sorted(again.skipped) == sorted(first.converted)
  storage = open_storage(location, s3_server.endpoint_url)
  info = fmt.parse_metadata(storage.read_bytes("metadata.yaml").decode())
  assert info == bdd100k.dataset_info()
  np.testing.assert_array_equal(fmt.decode_annotation(storage.read_bytes(f"panoptic_maps/{STEM}.tif"), info),
                                _expected("ignore"))


def test_the_command(tmp_path, capsys):
  _write_tree(tmp_path / "bdd")
  code = cli.main(["bdd100k", "--root", str(tmp_path / "bdd"), "--split", "val", "--out", str(tmp_path / "out"),
                   "--workers", "1", "--no_progress"])
  assert code == 0 and "converted 2" in capsys.readouterr().out
  _, maps = _load(tmp_path / "out")
  assert sorted(maps) == sorted([STEM, "c2"])
