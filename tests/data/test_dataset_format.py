"""metadata.yaml parsing and the 2-page TIFF codec (panoptic_jax/data/dataset_format.py)."""

import io
import logging
import struct
import warnings
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from panoptic_jax.data import dataset_format as fmt

META = """\
task: panoptic segmentation
annotations: panoptic_maps/
categories: [cat1, cat2, cat3, cat4]
things: [cat1, cat2]
colors:
  cat1: [255, 0, 0]
  cat2: [0, 0, 255]
  cat3: [255, 255, 0]
  cat4: [0, 255, 0]
"""


@pytest.fixture
def info():
  return fmt.parse_metadata(META)


def _meta(**overrides) -> str:
  lines = {"task": "panoptic segmentation", "annotations": "panoptic_maps/", "categories": "[a, b]",
           "colors": "{a: [255, 0, 0], b: [0, 0, 255]}"}
  lines.update(overrides)
  return "\n".join(f"{k}: {v}" for k, v in lines.items() if v is not None) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# metadata.yaml


def test_metadata_parses_the_seed_example():
  info = fmt.parse_metadata(META)
  assert info.categories == ("cat1", "cat2", "cat3", "cat4")
  assert info.colors == ((255, 0, 0), (0, 0, 255), (255, 255, 0), (0, 255, 0))
  assert info.is_thing == (True, True, False, False)
  assert info.annotations == "panoptic_maps"
  assert list(info.thing_ids) == [0, 1] and list(info.stuff_ids) == [2, 3]


def test_metadata_without_things_makes_every_category_a_thing():
  assert fmt.parse_metadata(_meta()).is_thing == (True, True)


@pytest.mark.parametrize("task", ["instance segmentation", "", None])
def test_unknown_task(task):
  with pytest.raises(fmt.FormatError, match=r"m\.yaml: task: expected 'panoptic segmentation'"):
    fmt.parse_metadata(_meta(task=task), where="m.yaml")


def test_duplicate_colors():
  with pytest.raises(fmt.FormatError, match=r"a and b share the colour \[255, 0, 0\]"):
    fmt.parse_metadata(_meta(colors="{a: [255, 0, 0], b: [255, 0, 0]}"))


def test_black_color():
  with pytest.raises(fmt.FormatError, match=r"colors\.b: black \[0, 0, 0\] is reserved"):
    fmt.parse_metadata(_meta(colors="{a: [255, 0, 0], b: [0, 0, 0]}"))


@pytest.mark.parametrize("color", ["[256, 0, 0]", "[1, 2]", "red", "[-1, 0, 0]", "[1.5, 0, 0]", "[true, 0, 0]",
                                   "[1, 2, 3, 4]"])
def test_color_not_an_rgb_triplet(color):
  with pytest.raises(fmt.FormatError, match=r"colors\.a: expected an RGB triplet of integers 0-255"):
    fmt.parse_metadata(_meta(colors=f"{{a: {color}, b: [0, 0, 255]}}"))


def test_things_naming_an_unknown_category():
  with pytest.raises(fmt.FormatError, match=r"things: \['zebra'\] are not in categories"):
    fmt.parse_metadata(_meta(things="[a, zebra]"))


def test_colors_naming_an_unknown_category():
  with pytest.raises(fmt.FormatError, match=r"colors: \['zebra'\] are not in categories"):
    fmt.parse_metadata(_meta(colors="{a: [255, 0, 0], zebra: [0, 0, 255]}"))


def test_category_without_color_warns(caplog):
  with caplog.at_level(logging.WARNING):
    info = fmt.parse_metadata(_meta(colors="{a: [255, 0, 0]}"), where="m.yaml")
  assert info.colors == ((255, 0, 0), None)
  assert "m.yaml" in caplog.text and "['b'] have no colour" in caplog.text


@pytest.mark.parametrize("text", ["[1, 2]", "task: [unclosed", ""])
def test_metadata_not_a_mapping_or_not_yaml(text):
  with pytest.raises(fmt.FormatError, match="m.yaml"):
    fmt.parse_metadata(text, where="m.yaml")


def test_metadata_yaml_round_trip(info):
  assert fmt.parse_metadata(fmt.metadata_yaml(info)) == info
  odd = fmt.DatasetInfo(("person", "yes", "a: b", "123", "sky"), ((1, 2, 3), None, (4, 5, 6), (7, 8, 9), (9, 9, 9)),
                        (True, False, True, False, False), "maps", 256)
  assert fmt.parse_metadata(fmt.metadata_yaml(odd)) == odd


# ----------------------------------------------------------------------------------------------------------------------
# TIFF annotations


def _random_panoptic(info, hw=(24, 32), seed=0, max_instances=5):
  """A canonical map: random category per block, instances 1..K for things, 0 for stuff, some void."""
  rng = np.random.default_rng(seed)
  cat = rng.integers(-1, info.num_classes, size=hw)
  inst = rng.integers(1, max_instances + 1, size=hw)
  is_thing = np.asarray(info.is_thing)[np.maximum(cat, 0)]
  panoptic = np.where(cat < 0, fmt.VOID, cat * info.label_divisor + np.where(is_thing, inst, 0))
  return _canonical(panoptic.astype(np.int32), info)


def _canonical(panoptic, info):
  """Renumbers thing instances 1..K per category in increasing order (what decoding produces)."""
  out = panoptic.copy()
  for c in info.thing_ids:
    values = np.unique(panoptic[(panoptic // info.label_divisor == c) & (panoptic != fmt.VOID)])
    for rank, v in enumerate(values, 1):
      out[panoptic == v] = c * info.label_divisor + rank
  return out


def _write_tiff(pages, photometrics=None) -> bytes:
  buffer = io.BytesIO()
  photometrics = photometrics or ["rgb", "minisblack"][:len(pages)] + ["minisblack"] * (len(pages) - 2)
  with tifffile.TiffWriter(buffer) as tiff:
    for page, photometric in zip(pages, photometrics):
      tiff.write(page, photometric=photometric)
  return buffer.getvalue()


def _pages_of(panoptic, info, id_dtype=np.uint8, id_offset=0):
  """Channels-last RGB page and instance page of a canonical map (ids shifted to test arbitrary values)."""
  void = panoptic == fmt.VOID
  category = np.where(void, 0, panoptic // info.label_divisor)
  lut = np.array(info.colors, np.uint8)
  rgb = np.where(void[..., None], np.uint8(0), lut[category])
  ids = np.where(void, 0, (panoptic % info.label_divisor).astype(np.int64) + id_offset).astype(id_dtype)
  return rgb, ids


def test_encode_decode_round_trip(info):
  panoptic = _random_panoptic(info)
  decoded = fmt.decode_annotation(fmt.encode_annotation(panoptic, info), info)
  assert decoded.dtype == np.int32
  np.testing.assert_array_equal(decoded, panoptic)


@pytest.mark.parametrize("id_dtype,id_offset", [(np.uint8, 0), (np.uint8, 250), (np.uint16, 60000),
                                                (np.uint32, 4_000_000_000)])
@pytest.mark.parametrize("channels_first", [True, False])
def test_decode_id_dtypes_and_planar_layouts(info, id_dtype, id_offset, channels_first):
  panoptic = _random_panoptic(info, max_instances=3)
  rgb, ids = _pages_of(panoptic, info, id_dtype, id_offset)
  page1 = np.ascontiguousarray(np.moveaxis(rgb, -1, 0)) if channels_first else rgb
  data = _write_tiff([page1, ids])
  with tifffile.TiffFile(io.BytesIO(data)) as tiff:
    assert tiff.pages[1].dtype == id_dtype
  np.testing.assert_array_equal(fmt.decode_annotation(data, info), panoptic)


@pytest.mark.parametrize("hw", [(4, 6), (3, 8)])
@pytest.mark.parametrize("channels_first", [True, False])
def test_planar_layout_comes_from_the_header_when_the_shape_fits_both(info, hw, channels_first):
  """A 4-row map stored channels-last is [4, 6, 3]: its shape alone does not tell which axis holds the colours."""
  panoptic = _random_panoptic(info, hw=hw, max_instances=2)
  rgb, ids = _pages_of(panoptic, info)
  page1 = np.ascontiguousarray(np.moveaxis(rgb, -1, 0)) if channels_first else rgb
  np.testing.assert_array_equal(fmt.decode_annotation(_write_tiff([page1, ids]), info), panoptic)


def test_encode_picks_wider_id_dtype_for_many_instances():
  info = fmt.DatasetInfo(("a",), ((9, 9, 9),), (True,), label_divisor=1000)
  panoptic = (np.arange(600, dtype=np.int32) + 1).reshape(20, 30)
  data = fmt.encode_annotation(panoptic, info)
  with tifffile.TiffFile(io.BytesIO(data)) as tiff:
    assert tiff.pages[1].dtype == np.uint16
  np.testing.assert_array_equal(fmt.decode_annotation(data, info), panoptic)


@pytest.mark.parametrize("factor", [2, 4])
def test_downscaled_map_is_resized_back(info, factor):
  small = _random_panoptic(info, hw=(12, 16))
  big = np.repeat(np.repeat(small, factor, axis=0), factor, axis=1)  # Exactly what nearest upscaling gives.
  data = fmt.encode_annotation(big, info, downscale=factor)
  with tifffile.TiffFile(io.BytesIO(data)) as tiff:
    assert tiff.pages[1].shape == (12, 16)
  np.testing.assert_array_equal(fmt.decode_annotation(data, info, image_hw=big.shape), big)


def test_seed_toy_example_random_colors_fail_with_palette_error(info, tmp_path):
  # The seed text's own snippet, verbatim apart from the path.
  category_map = np.random.randint(0, 256, size=(3, 100, 100), dtype=np.uint8)  # channels-first!
  id_map = np.random.randint(0, 256, size=(100, 100), dtype=np.uint8)
  with tifffile.TiffWriter(tmp_path / "tmp.tiff") as tiff_writer:
    tiff_writer.write(category_map, photometric="rgb")
    tiff_writer.write(id_map, photometric="minisblack")
  with tifffile.TiffFile(tmp_path / "tmp.tiff") as tiff_file:
    images = [page.asarray() for page in tiff_file.pages]
  assert images[0].shape == (3, 100, 100)
  assert images[1].shape == (100, 100)
  with pytest.raises(fmt.FormatError, match=r"tmp\.tiff: \d+ colours are not in the metadata palette"):
    fmt.decode_annotation((tmp_path / "tmp.tiff").read_bytes(), info, where="tmp.tiff")


def test_seed_toy_example_with_palette_colors_loads(info, tmp_path):
  rng = np.random.default_rng(0)
  palette = np.array([[0, 0, 0]] + [list(c) for c in info.colors], np.uint8)
  category_map = np.moveaxis(palette[rng.integers(0, len(palette), size=(100, 100))], -1, 0).copy()  # channels-first!
  id_map = rng.integers(0, 256, size=(100, 100), dtype=np.uint8)
  with tifffile.TiffWriter(tmp_path / "tmp.tiff") as tiff_writer:
    tiff_writer.write(category_map, photometric="rgb")
    tiff_writer.write(id_map, photometric="minisblack")
  panoptic = fmt.decode_annotation((tmp_path / "tmp.tiff").read_bytes(), info, where="tmp.tiff")
  category = np.moveaxis(category_map, 0, -1)
  void = (category == 0).all(-1)
  assert panoptic.shape == (100, 100)
  np.testing.assert_array_equal(panoptic == fmt.VOID, void)
  red = (category == [255, 0, 0]).all(-1)  # cat1, a thing: one instance per distinct id.
  assert len(np.unique(panoptic[red])) == len(np.unique(id_map[red]))
  assert (panoptic[red] // info.label_divisor == 0).all()
  yellow = (category == [255, 255, 0]).all(-1)  # cat3, stuff: one segment whatever the ids.
  assert set(np.unique(panoptic[yellow])) == {2 * info.label_divisor}


@pytest.mark.parametrize("num_pages", [1, 3])
def test_wrong_page_count(info, num_pages):
  rgb, ids = _pages_of(_random_panoptic(info), info)
  pages = [np.moveaxis(rgb, -1, 0).copy(), ids, ids][:num_pages]
  with pytest.raises(fmt.FormatError, match=rf"x\.tif: expected 2 pages .* found {num_pages}"):
    fmt.decode_annotation(_write_tiff(pages), info, where="x.tif")


def test_page_shapes_differ(info):
  rgb, ids = _pages_of(_random_panoptic(info), info)
  with pytest.raises(fmt.FormatError, match=r"x\.tif: page shapes differ"):
    fmt.decode_annotation(_write_tiff([rgb, ids[:-2]]), info, where="x.tif")


@pytest.mark.parametrize("image_hw", [(48, 48), (24, 64), (12, 16), (100, 32)])
def test_wrong_aspect_ratio_or_larger_than_image(info, image_hw):
  data = fmt.encode_annotation(_random_panoptic(info, hw=(24, 32)), info)
  with pytest.raises(fmt.FormatError, match=r"x\.tif: annotation is 24x32"):
    fmt.decode_annotation(data, info, image_hw=image_hw, where="x.tif")


@pytest.mark.parametrize("data", [b"", b"not a tiff at all"])
def test_undecodable_bytes(info, data):
  with pytest.raises(fmt.FormatError, match=r"x\.tif: cannot decode as TIFF"):
    fmt.decode_annotation(data, info, where="x.tif")


def test_tiff_header_without_pages(info):
  with pytest.raises(fmt.FormatError, match=r"x\.tif: expected 2 pages .* found 0"):
    fmt.decode_annotation(b"II*\x00" + b"\xff" * 20, info, where="x.tif")


def test_truncated_tiff(info):
  data = fmt.encode_annotation(_random_panoptic(info), info)
  with pytest.raises(fmt.FormatError, match=r"x\.tif"):
    fmt.decode_annotation(data[: len(data) // 2], info, where="x.tif")


def test_image_codec_round_trip():
  image = np.random.default_rng(0).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
  np.testing.assert_array_equal(fmt.decode_image(fmt.encode_image(image, ".png")), image)
  with pytest.raises(fmt.FormatError, match="img.jpg: cannot decode as an image"):
    fmt.decode_image(b"garbage", where="img.jpg")


# ----------------------------------------------------------------------------------------------------------------------
# Images of any mode

_FULL_RANGE = np.array([[0, 255, 32896, 65280, 65535]], np.uint16)  # round(v / 257): 0, 1, 128, 254, 255.


def _png16(samples: np.ndarray) -> bytes:
  """A 16-bit PNG of uint16 [H, W] (gray) or [H, W, 3] (RGB), written by hand: Pillow cannot write 16-bit RGB."""
  h, w = samples.shape[:2]
  color_type = 2 if samples.ndim == 3 else 0
  rows = samples.astype(">u2").reshape(h, -1).view(np.uint8)
  raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # Filter type 0 (none) per row.

  def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

  header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, format_: str = "PNG", **options) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format_, **options)
  return buffer.getvalue()


def test_16_bit_gray_png_keeps_the_full_range():
  for data in (_png16(_FULL_RANGE), _encoded(Image.fromarray(_FULL_RANGE))):  # Hand-written and Pillow's own.
    with Image.open(io.BytesIO(data)) as image:
      assert image.mode.startswith("I;16")
    decoded = fmt.decode_image(data)
    assert decoded.shape == (1, 5, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[0], np.repeat([[0], [1], [128], [254], [255]], 3, axis=1))


def test_16_bit_rgb_png_keeps_the_full_range():
  """Pillow decodes 16-bit colour to the high byte: 65535 -> 255 and 32896 -> 128 as by the gray scaling."""
  samples = np.stack([_FULL_RANGE, _FULL_RANGE[:, ::-1], np.full_like(_FULL_RANGE, 32896)], axis=-1)
  decoded = fmt.decode_image(_png16(samples))
  assert decoded.shape == (1, 5, 3)
  np.testing.assert_array_equal(decoded[0, [0, 2, 4]], [[0, 255, 128], [128, 128, 128], [255, 0, 128]])
  np.testing.assert_array_less(np.abs(decoded.astype(int) - (samples.astype(int) + 128) // 257), 2)


def test_32_bit_gray_is_read_as_16_bit_samples():
  data = _encoded(Image.fromarray(np.array([[0, 32896, 65535]], np.int32)), "TIFF")
  with Image.open(io.BytesIO(data)) as image:
    assert image.mode == "I"
  np.testing.assert_array_equal(fmt.decode_image(data)[0, :, 0], [0, 128, 255])


@pytest.mark.parametrize("mode, value, rgb", [
    ("L", 77, (77, 77, 77)),
    ("1", 1, (255, 255, 255)),
    ("LA", (77, 0), (77, 77, 77)),                   # Alpha dropped: the stored gray, not a background.
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),         # Fully transparent: still the stored colour.
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_modes_become_rgb(mode, value, rgb):
  data = _encoded(Image.new(mode, (4, 3), value), "JPEG" if mode == "CMYK" else "PNG")
  decoded = fmt.decode_image(data)
  assert decoded.shape == (3, 4, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded[1, 2], rgb)


@pytest.mark.parametrize("transparency", [None, 1, b"\x00\x80"])
def test_palette_with_and_without_transparency(transparency):
  image = Image.fromarray(np.array([[0, 1], [2, 1]], np.uint8), mode="P")
  image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
  if transparency is not None:
    image.info["transparency"] = transparency
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # Pillow warns when a palette with per-entry alpha is converted to RGB directly.
    decoded = fmt.decode_image(_encoded(image))
  np.testing.assert_array_equal(decoded, [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [0, 255, 0]]])


def test_exif_orientation_is_applied_only_when_asked():
  image = np.zeros((4, 8, 3), np.uint8)
  image[:, :4] = 255  # Left half white: after a 90 degree clockwise turn (orientation 6) the top half is.
  exif = Image.Exif()
  exif[0x0112] = 6
  data = _encoded(Image.fromarray(image), "JPEG", exif=exif, quality=95)
  stored = fmt.decode_image(data)
  assert stored.shape == (4, 8, 3) and stored[2, 1, 0] > 200 and stored[2, 6, 0] < 50
  turned = fmt.decode_image(data, apply_exif=True)
  assert turned.shape == (8, 4, 3) and turned[1, 2, 0] > 200 and turned[6, 2, 0] < 50


def test_truncated_jpeg_names_the_file():
  data = _encoded(Image.fromarray(np.full((32, 32, 3), 99, np.uint8)), "JPEG")
  with pytest.raises(fmt.FormatError, match=r"^photos/cut\.jpg: cannot decode as an image: OSError"):
    fmt.decode_image(data[: len(data) // 2], where="photos/cut.jpg")


# ----------------------------------------------------------------------------------------------------------------------
# Segment lists


def test_number_segments_renumbers_as_decoding_does_and_lists_area_bbox_score(info):
  panoptic = _random_panoptic(info, max_instances=9)
  sparse = np.where((panoptic >= 0) & np.isin(panoptic // info.label_divisor, info.thing_ids),
                    panoptic + 3 * (panoptic % info.label_divisor), panoptic)  # Instances 4, 8, 12, ...
  scores = {int(v): 0.5 + v / 1e5 for v in np.unique(sparse) if v >= 0}
  renumbered, segments = fmt.number_segments(sparse, info, scores)
  np.testing.assert_array_equal(renumbered, panoptic)
  np.testing.assert_array_equal(fmt.decode_annotation(fmt.encode_annotation(renumbered, info), info), renumbered)
  assert [s.id for s in segments.segments] == list(range(1, len(scores) + 1))
  for s, (old, score) in zip(segments.segments, sorted(scores.items())):
    value = info.categories.index(s.category) * info.label_divisor + s.instance
    rows, cols = np.nonzero(renumbered == value)
    assert (s.area, s.score, s.isthing) == (len(rows), score, bool(old % info.label_divisor))
    assert s.bbox == (cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min())
  decoded = fmt.decode_segments(fmt.encode_segments(segments), info)
  assert decoded == segments
  assert decoded.scores(info) == {int(v): scores[int(old)] for v, old in zip(renumbered.ravel(), sparse.ravel())
                                  if v >= 0}


def test_number_segments_refuses_unscored_segments_and_stuff_instances(info):
  panoptic = np.array([[0, 2 * info.label_divisor]], np.int32)
  with pytest.raises(ValueError, match=r"segments \[2000\] of the map have no score"):
    fmt.number_segments(panoptic, info, {0: 1.0})
  with pytest.raises(ValueError, match=r"stuff values \[2001\] have an instance other than 0"):
    fmt.number_segments(panoptic + 1, info, {1: 1.0, 2001: 1.0})
