"""The label-space bridge (panoptic_jax/data/class_map.py): their names -> ours, many-to-one, void, clear errors."""

import numpy as np
import pytest

from panoptic_jax.data import class_map as class_map_lib
from panoptic_jax.data.class_map import ClassMap, ClassMapError
from panoptic_jax.data.storage import StorageError, open_storage

THEIRS = ["road", "parking", "rail track", "car", "truck", "sky", "1"]
OURS = ["road", "car", "person", "sky", "7"]
TEXT = """\
# KITTI-like -> Cityscapes-like
road: road
parking: road        # many-to-one
rail track: null     # void
car: car
truck: car
1: 7                 # numbers are names too, as in metadata.yaml
"""


def test_resolve_many_to_one_null_and_unlisted():
  class_map = ClassMap.parse(TEXT, where="m.yaml")
  assert class_map.entries == {"road": "road", "parking": "road", "rail track": None, "car": "car", "truck": "car",
                               "1": "7"}
  index, report = class_map.resolve(THEIRS, OURS)
  assert index.dtype == np.int64 and index.tolist() == [0, 0, -1, 1, 1, -1, 4]
  assert report.mapped == {"road": "road", "parking": "road", "car": "car", "truck": "car", "1": "7"}
  assert report.ignored == ("rail track", "sky") and report.unlisted == ("sky",)
  assert report.unreached == ("person", "sky")
  assert report.as_dict()["ignored"] == ["rail track", "sky"]


def test_match_by_name():
  index, report = class_map_lib.match_by_name(THEIRS, OURS)
  assert index.tolist() == [0, -1, -1, 1, -1, 3, -1]
  assert report.ignored == report.unlisted == ("parking", "rail track", "truck", "1")
  assert report.unreached == ("person", "7")


def test_unknown_names_on_either_side_are_named_with_the_names_that_exist():
  class_map = ClassMap.parse("road: road\ncarr: car\nsky: heaven\ntruck: lorry\n", where="m.yaml")
  with pytest.raises(ClassMapError) as e:
    class_map.resolve(THEIRS, OURS, their="the GT's categories", ours="the predictions' categories")
  message = str(e.value)
  assert message.startswith("m.yaml: entries 'carr: car': 'carr' is not among the GT's categories ['road', 'parking',")
  assert ("entries 'sky: heaven', 'truck: lorry': 'heaven', 'lorry' are not among the predictions' categories "
          "['road', 'car', 'person', 'sky', '7']") in message


@pytest.mark.parametrize("text, expected", [
    ("road: road\nroad: car\n", "'road' is listed twice (lines 1 and 2)"),
    ("1: road\n'1': car\n", "'1' is listed twice"),
    ("[road, car]\n", "expected a mapping 'their name: our name'"),
    ("", "found an empty file"),
    ("road: [road]\n", "entry 'road': value ['road']: expected a category name"),
    ("on: road\n", "key True: expected a category name (a string; quote names such as 'on'"),
    ("null: road\n", "key null"),
    ("road: road\n  car: car\n", "not valid YAML"),
])
def test_malformed_files(text, expected):
  with pytest.raises(ClassMapError, match="^m.yaml: ") as e:
    ClassMap.parse(text, where="m.yaml")
  assert expected in str(e.value)


def test_read_local_and_s3(tmp_path, s3_root):
  (tmp_path / "map.yaml").write_text(TEXT)
  assert ClassMap.read(tmp_path / "map.yaml").entries["truck"] == "car"
  assert ClassMap.read(tmp_path / "map.yaml").where == str(tmp_path / "map.yaml")
  location = f"s3://{s3_root}/maps/map.yaml"
  open_storage(f"s3://{s3_root}/maps").write_bytes("map.yaml", TEXT.encode())
  assert ClassMap.read(location).entries == ClassMap.parse(TEXT).entries
  with pytest.raises(StorageError, match="missing.yaml"):
    ClassMap.read(tmp_path / "missing.yaml")
  (tmp_path / "latin1.yaml").write_bytes("stra\xdfe: road\n".encode("latin-1"))
  with pytest.raises(ClassMapError, match="latin1.yaml: expected UTF-8"):
    ClassMap.read(tmp_path / "latin1.yaml")
