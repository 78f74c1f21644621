"""Mapillary Vistas panoptic -> dataset format: a tiny v2.0 / v1.2 tree (images of different sizes, things, stuff,
crowd, a void label, shared colours), read back through Dataset; failures, resume, config handling and S3 output."""

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import __main__ as cli
from panoptic_jax.data.convert import mapillary
from panoptic_jax.data.dataset import Dataset

# config_*.json labels (name, readable, colour, instances, evaluate), a small subset in the dataset's style. Person
# Group shares Person's colour, as in v2.0; Static and Unlabeled are not evaluated.
LABELS = [
    ("construction--flat--road", "Road", [128, 64, 128], False, True),
    ("human--person--individual", "Person", [220, 20, 60], True, True),
    ("object--vehicle--car", "Car", [0, 0, 142], True, True),
    ("human--person--person-group", "Person Group", [220, 20, 60], False, True),
    ("nature--sky", "Sky", [70, 130, 180], False, True),
    ("void--static", "Static", [111, 111, 0], False, False),
    ("void--unlabeled", "Unlabeled", [0, 0, 0], False, False),
]
ROAD, PERSON, CAR, GROUP, SKY = range(5)  # Indices in the converted metadata (Static is void, Unlabeled unlisted).
STATIC_ID = 6  # Its category_id in the panoptic JSON (config index + 1, as in panoptic_2018.json).


def _rgb(ids: np.ndarray) -> np.ndarray:
  return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def _segments(ids: np.ndarray, listed: dict[int, tuple[int, int]]) -> list[dict]:
  """{segment id: (category_id, iscrowd)} -> segments_info with the areas of `ids`."""
  return [{"id": sid, "category_id": cid, "iscrowd": crowd, "area": int((ids == sid).sum()), "bbox": [0, 0, 1, 1]}
          for sid, (cid, crowd) in listed.items()]


def _write_vistas(root: pathlib.Path, version: str = "v2.0", split: str = "training") -> dict[str, np.ndarray]:
  """Writes the tree; returns each annotated image's PNG ids."""
  panoptic = root / split / version / "panoptic"
  panoptic.mkdir(parents=True)
  (root / split / "images").mkdir(parents=True)
  (root / f"config_{version}.json").write_text(json.dumps({"labels": [
      {"name": n, "readable": r, "color": c, "instances": i, "evaluate": e} for n, r, c, i, e in LABELS]}))
  categories = [{"id": k + 1, "name": r, "supercategory": n, "isthing": int(i), "color": c}
                for k, (n, r, c, i, _) in enumerate(LABELS[:-1])]  # Unlabeled is not listed; its pixels are id 0.

  a = np.zeros((40, 60), np.int64)  # 0 = unlabeled
  a[:10] = 5  # sky
  a[30:] = 1  # road
  a[10:30, :10] = 70000  # car (an id that needs the blue channel)
  a[10:30, 10:20] = 300  # car
  a[10:30, 20:30] = 2  # person
  a[10:30, 30:40] = 9  # a car crowd
  a[10:30, 40:50] = 11  # static: void
  b = np.full((30, 50), 1, np.int64)  # road
  b[:, 20:30] = 4  # person
  b[:, 30:] = 8  # person group (stuff)
  c = np.full((20, 24), 1, np.int64)
  annotations = {
      "a": _segments(a, {5: (5, 0), 1: (1, 0), 70000: (3, 0), 300: (3, 0), 2: (2, 0), 9: (3, 1), 11: (STATIC_ID, 0)}),
      "b": _segments(b, {1: (1, 0), 4: (2, 0), 8: (4, 0)}),
      "c": _segments(c, {1: (1, 0)}),
  }
  ids = {"a": a, "b": b, "c": c}
  images = []
  for key, label in ids.items():
    Image.fromarray(_rgb(label)).save(panoptic / f"{key}.png")
    h, w = label.shape
    if key == "c":
      w = 20  # The image and the JSON say 20 wide; the PNG is 24 wide.
    Image.new("RGB", (w, h), (90, 120, 30)).save(root / split / "images" / f"{key}.jpg")
    images.append({"id": key, "file_name": f"{key}.jpg", "height": h, "width": w})
  Image.new("RGB", (8, 8)).save(root / split / "images" / "d.jpg")
  images.append({"id": "d", "file_name": "d.jpg", "height": 8, "width": 8})  # Listed without an annotation.
  (panoptic / mapillary.PANOPTIC_JSON[version]).write_text(json.dumps({
      "images": images, "categories": categories,
      "annotations": [{"image_id": k, "file_name": f"{k}.png", "segments_info": s} for k, s in annotations.items()]}))
  return ids


def _expected(ids: dict[str, np.ndarray], crowd: str) -> dict[str, np.ndarray]:
  a = np.full(ids["a"].shape, fmt.VOID, np.int32)
  keep = crowd == "keep"
  a[ids["a"] == 5] = SKY * 1000
  a[ids["a"] == 1] = ROAD * 1000
  a[ids["a"] == 70000] = CAR * 1000 + 1 + keep  # Cars 1..n in segments_info order; a kept crowd (on-disk id 0)
  a[ids["a"] == 300] = CAR * 1000 + 2 + keep  # decodes as the lowest-numbered car.
  a[ids["a"] == 9] = CAR * 1000 + 1 if keep else fmt.VOID
  a[ids["a"] == 2] = PERSON * 1000 + 1
  b = np.full(ids["b"].shape, ROAD * 1000, np.int32)
  b[ids["b"] == 4] = PERSON * 1000 + 1
  b[ids["b"] == 8] = GROUP * 1000
  return {"a": a, "b": b}


@pytest.mark.parametrize("crowd", ["ignore", "keep"])
def test_converts_categories_maps_crowd_and_failures(tmp_path, crowd):
  ids = _write_vistas(tmp_path / "vistas")
  out = tmp_path / "out"
  summary = mapillary.convert(str(tmp_path / "vistas"), "training", str(out), crowd=crowd, progress=False)
  assert sorted(summary.converted) == ["a", "b"], summary.text()
  assert [name for name, _ in summary.failed] == ["c"]
  assert "is 20x20 but its annotation is 20x24" in summary.failed[0][1] and "c.jpg" in summary.failed[0][1]
  assert summary.unpaired == [("d.jpg", "listed in `images` but has no annotation")]
  assert summary.stats["ignored-class segments to void"] == 1
  assert summary.stats[f"crowd {'kept' if crowd == 'keep' else 'to void'}"] == 1
  assert summary.stats["thing instances"] == 4 and summary.stats["stuff segments"] == 4

  dataset = Dataset.open(out)
  info = dataset.info
  assert info.categories == ("Road", "Person", "Car", "Person Group", "Sky")  # The JSON's names; Static is void.
  assert info.is_thing == (False, True, True, False, False)
  assert [info.colors[i] for i in (ROAD, PERSON, CAR, SKY)] == [(128, 64, 128), (220, 20, 60), (0, 0, 142),
                                                                 (70, 130, 180)]
  assert info.colors[GROUP] not in info.colors[:GROUP] and max(abs(x - y) for x, y in
                                                              zip(info.colors[GROUP], (220, 20, 60))) == 1
  assert dataset.names == ["a", "b"] and not dataset.unpaired_images
  expected = _expected(ids, crowd)
  for i, name in enumerate(dataset.names):
    example = dataset.read_example(i)
    assert example["image"].shape[:2] == ids[name].shape  # Each at its own size.
    np.testing.assert_array_equal(example["panoptic"], expected[name], err_msg=name)
  assert (out / "images" / "a.jpg").read_bytes() == (tmp_path / "vistas" / "training" / "images" / "a.jpg").read_bytes()
  assert f"Mapillary Vistas v2.0 training (panoptic_2020.json, config config_v2.0.json) with --crowd {crowd}" in (
      out / "metadata.yaml").read_text()


def test_resume_skips_done_and_retries_failed(tmp_path):
  _write_vistas(tmp_path / "vistas")
  out = tmp_path / "out"
  first = mapillary.convert(str(tmp_path / "vistas"), "train", str(out), progress=False)  # train -> training/
  before = {p.name: p.read_bytes() for p in (out / "panoptic_maps").iterdir()}
  second = mapillary.convert(str(tmp_path / "vistas"), "train", str(out), progress=False)
  assert sorted(first.converted) == ["a", "b"] and not second.converted and sorted(second.skipped) == ["a", "b"]
  assert [name for name, _ in second.failed] == ["c"]  # Still broken: retried, failed again, nothing written.
  (out / "panoptic_maps" / "b.tif").unlink()  # As if interrupted between image and annotation.
  third = mapillary.convert(str(tmp_path / "vistas"), "train", str(out), progress=False)
  assert third.converted == ["b"] and third.skipped == ["a"]
  assert {p.name: p.read_bytes() for p in (out / "panoptic_maps").iterdir()} == before
  with pytest.raises(ValueError, match="--crowd ignore"):  # A resumed run may not mix conventions.
    mapillary.convert(str(tmp_path / "vistas"), "train", str(out), crowd="keep", progress=False)


def test_v12_layouts(tmp_path):
  """v1.2 in the v2.0 download (<split>/v1.2/panoptic/panoptic_2018.json) and the older one (<split>/panoptic/,
  config.json) give the same dataset."""
  ids = _write_vistas(tmp_path / "new", version="v1.2", split="validation")
  summary = mapillary.convert(str(tmp_path / "new"), "val", str(tmp_path / "a"), version="v1.2", progress=False)
  assert sorted(summary.converted) == ["a", "b"], summary.text()
  old = tmp_path / "old"
  _write_vistas(old, version="v1.2", split="validation")
  (old / "validation" / "v1.2" / "panoptic").rename(old / "validation" / "panoptic")
  (old / "config_v1.2.json").rename(old / "config.json")
  assert sorted(mapillary.convert(str(old), "validation", str(tmp_path / "b"), version="v1.2",
                                  progress=False).converted) == ["a", "b"]
  for name in ("panoptic_maps/a.tif", "panoptic_maps/b.tif"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  assert Dataset.open(tmp_path / "b").info == Dataset.open(tmp_path / "a").info
  assert "Mapillary Vistas v1.2 validation (panoptic_2018.json, config config.json)" in (
      tmp_path / "b" / "metadata.yaml").read_text()
  dataset = Dataset.open(tmp_path / "a")
  np.testing.assert_array_equal(dataset.read_panoptic(0), _expected(ids, "ignore")["a"])


def test_config_none_keeps_every_category_and_a_foreign_config_is_refused(tmp_path):
  root = tmp_path / "vistas"
  _write_vistas(root)
  out = tmp_path / "all"
  mapillary.convert(str(root), "training", str(out), config="none", progress=False)
  dataset = Dataset.open(out)
  assert dataset.info.categories[-1] == "Static"
  a = dataset.read_panoptic(dataset.names.index("a"))
  assert (a[10:30, 40:50] == 5 * 1000).all()  # Static is a stuff category now.
  config = json.loads((root / "config_v2.0.json").read_text())
  config["labels"] = [x for x in config["labels"] if x["readable"] != "Sky"]
  (tmp_path / "other.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"category 5 \('Sky'.*not among the config's labels"):
    mapillary.convert(str(root), "training", str(tmp_path / "x"), config=str(tmp_path / "other.json"),
                      progress=False)
  (root / "config_v2.0.json").unlink()
  with pytest.raises(ValueError, match="--config none"):
    mapillary.convert(str(root), "training", str(tmp_path / "y"), progress=False)
  with pytest.raises(ValueError, match="panoptic_2018.json"):
    mapillary.convert(str(root), "training", str(tmp_path / "z"), version="v1.2", progress=False)


def test_s3_output_with_workers_and_resume(tmp_path, s3_bucket, s3_server):
  _write_vistas(tmp_path / "vistas")
  location = f"s3://{s3_bucket}/vistas/training"
  summary = mapillary.convert(str(tmp_path / "vistas"), "training", location, endpoint_url=s3_server.endpoint_url,
                              workers=2, progress=False)
  assert sorted(summary.converted) == ["a", "b"] and [n for n, _ in summary.failed] == ["c"], summary.text()
  local = tmp_path / "local"
  mapillary.convert(str(tmp_path / "vistas"), "training", str(local), progress=False)
  dataset = Dataset.open(location, endpoint_url=s3_server.endpoint_url)
  assert dataset.names == ["a", "b"]
  for name in ("metadata.yaml", "images/b.jpg", "panoptic_maps/a.tif", "panoptic_maps/b.tif"):
    assert dataset.storage.read_bytes(name) == (local / name).read_bytes(), name
  again = mapillary.convert(str(tmp_path / "vistas"), "training", location, endpoint_url=s3_server.endpoint_url,
                            progress=False)
  assert not again.converted and sorted(again.skipped) == ["a", "b"]


def test_the_command(tmp_path, capsys):
  _write_vistas(tmp_path / "vistas")
  code = cli.main(["mapillary", "--root", str(tmp_path / "vistas"), "--split", "training", "--out",
                   str(tmp_path / "out"), "--workers", "1", "--no_progress"])
  printed = capsys.readouterr().out
  assert code == 1 and "converted 2" in printed and "failed 1" in printed  # Image c is broken on purpose.


def test_written_in_the_cityscapes_label_space_through_a_class_map(tmp_path, capsys):
  """`--class_map --label_space cityscapes`: Cityscapes' categories and colours; road and sky merge as stuff, cars
  and people keep one instance each, Person Group (stuff in Vistas) becomes one more person, unmapped classes void."""
  ids = _write_vistas(tmp_path / "vistas")
  source = mapillary.convert(str(tmp_path / "vistas"), "training", str(tmp_path / "plain"), progress=False)
  assert sorted(source.converted) == ["a", "b"]
  names = fmt.parse_metadata((tmp_path / "plain" / "metadata.yaml").read_text()).categories
  (tmp_path / "map.yaml").write_text(f"'{names[ROAD]}': road\n'{names[CAR]}': car\n'{names[PERSON]}': person\n"
                                     f"'{names[GROUP]}': person\n'{names[SKY]}': null\n")
  code = cli.main(["mapillary", "--root", str(tmp_path / "vistas"), "--split", "training", "--out",
                   str(tmp_path / "out"), "--workers", "1", "--no_progress", "--class_map", str(tmp_path / "map.yaml"),
                   "--label_space", "cityscapes"])
  assert code == 1 and "converted 2" in capsys.readouterr().out  # Image c is broken on purpose.
  dataset = Dataset.open(tmp_path / "out")
  assert dataset.info.categories[:3] == ("road", "sidewalk", "building") and len(dataset.info.categories) == 19
  road, person, car = 0, 11, 13
  maps = {name: dataset.read_panoptic(i) for i, name in enumerate(dataset.names)}
  b = maps["b"]
  expected = np.full(ids["b"].shape, road * 1000, np.int32)
  expected[ids["b"] == 4] = person * 1000 + 1
  expected[ids["b"] == 8] = person * 1000 + 2
  np.testing.assert_array_equal(b, expected)
  a = maps["a"]
  assert (a[ids["a"] == 5] == fmt.VOID).all()  # Sky: null in the map.
  assert sorted(np.unique(a[a // 1000 == car]).tolist()) == [car * 1000 + 1, car * 1000 + 2]
  bad = tmp_path / "bad.yaml"
  bad.write_text("'no such class': road\n")
  code = cli.main(["mapillary", "--root", str(tmp_path / "vistas"), "--split", "training", "--out",
                   str(tmp_path / "out2"), "--no_progress", "--class_map", str(bad), "--label_space", "cityscapes"])
  assert code == 2 and "'no such class'" in capsys.readouterr().err
