"""Reading COCO panoptic PNGs: ids are found through their low 16 bits, and by binary search when two listed ids
share them; both give the same maps."""

import json

import numpy as np
import pytest
from PIL import Image

from panoptic_jax.evaluation import coco_format
from panoptic_jax.evaluation.coco_format import CocoPanoptic
from panoptic_jax.evaluation.segment_stats import NO_CROWD, UNLISTED, VOID


def _write(tmp_path, ids: np.ndarray, segments: list[dict]) -> CocoPanoptic:
  folder = tmp_path / "png"
  folder.mkdir()
  rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)
  Image.fromarray(rgb).save(folder / "a.png")
  doc = {"annotations": [{"image_id": 1, "file_name": "a.png", "segments_info": segments}],
         "categories": [{"id": 1, "name": "car", "isthing": 1}, {"id": 2, "name": "road", "isthing": 0}]}
  (tmp_path / "gt.json").write_text(json.dumps(doc))
  return CocoPanoptic.open(str(tmp_path / "gt.json"), str(folder))


def test_ids_sharing_their_low_16_bits_and_unlisted_ids_read_exactly(tmp_path):
  ids = np.zeros((6, 8), np.int64)
  ids[:, 2:4] = 7
  ids[:, 4:6] = 7 + 65536  # The same low 16 bits as 7: the lookup falls back to binary search.
  ids[:3, 6:] = 3 * 65536 + 9  # Not listed: UNLISTED in the GT.
  ids[3:, 6:] = 11
  segments = [{"id": 7, "category_id": 1}, {"id": 7 + 65536, "category_id": 1}, {"id": 11, "category_id": 2}]
  loaded = _write(tmp_path, ids, segments).load("a", {1: 0, 2: 1}, 1000, is_gt=True)
  expected = np.select([ids == 7, ids == 7 + 65536, ids == 11], [0, 1, 1000], VOID)
  np.testing.assert_array_equal(loaded.panoptic, expected)
  np.testing.assert_array_equal(loaded.crowd, np.where(ids == 3 * 65536 + 9, UNLISTED, NO_CROWD))


@pytest.mark.parametrize("decoder", ["libspng", "opencv", "pillow"])
def test_every_png_decoder_gives_the_same_maps(tmp_path, monkeypatch, decoder):
  """pyspng when installed, else OpenCV, else Pillow: the same pixels, and a file that is no PNG is named."""
  if decoder != "libspng":
    monkeypatch.setattr(coco_format, "_pyspng", lambda: None)
  if decoder == "pillow":
    monkeypatch.setattr(coco_format, "opencv", lambda: None)
  ids = np.zeros((6, 8), np.int64)
  ids[:, 2:] = 7 + 65536 * 3
  ids[3:, 5:] = 11
  side = _write(tmp_path, ids, [{"id": 7 + 65536 * 3, "category_id": 1}, {"id": 11, "category_id": 2}])
  loaded = side.load("a", {1: 0, 2: 1}, 1000, is_gt=True)
  np.testing.assert_array_equal(loaded.panoptic, np.select([ids == 7 + 65536 * 3, ids == 11], [0, 1000], VOID))
  (tmp_path / "png" / "a.png").write_bytes(b"not a png")
  with pytest.raises(coco_format.CocoFormatError, match=r"a\.png: cannot read the PNG of image 1"):
    side.load("a", {1: 0, 2: 1}, 1000, is_gt=True)


def test_the_fast_lookup_gives_the_same_maps_as_binary_search(tmp_path):
  rng = np.random.default_rng(0)
  listed = rng.choice(1 << 24, 30, replace=False)
  ids = rng.choice(np.append(listed, 0), (20, 30))
  segments = [{"id": int(i), "category_id": 1 + int(k % 2)} for k, i in enumerate(listed)]
  loaded = _write(tmp_path, ids, segments).load("a", {1: 0, 2: 1}, 1000, is_gt=True)
  value = {0: VOID}
  counters = {0: 0, 1: 0}
  for k, i in enumerate(listed):
    category = k % 2
    value[int(i)] = category * 1000 + counters[category]
    counters[category] += 1
  np.testing.assert_array_equal(loaded.panoptic, np.vectorize(value.get)(ids))


def test_an_unlisted_id_sharing_a_listed_ids_red_and_green_is_unlisted(tmp_path):
  """Pixels find their segment by R and G; the B byte decides between a listed id and an unlisted one."""
  ids = np.zeros((6, 8), np.int64)
  ids[:, :4] = 9
  ids[:2, 4:] = 5 * 65536 + 9  # R and G of id 9, another B: not listed.
  segments = [{"id": 9, "category_id": 1}]
  gt = _write(tmp_path, ids, segments).load("a", {1: 0, 2: 1}, 1000, is_gt=True)
  np.testing.assert_array_equal(gt.panoptic, np.where(ids == 9, 0, VOID))
  np.testing.assert_array_equal(gt.crowd, np.where(ids == 5 * 65536 + 9, UNLISTED, NO_CROWD))
