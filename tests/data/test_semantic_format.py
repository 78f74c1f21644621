"""The dataset format's semantic variant: `task: semantic segmentation`, one RGB label image per image (PNG or a
single-page TIFF), black = void; metadata, decoding, listing and `python -m panoptic_jax.data.validate`."""

import io
import json

import numpy as np
import pytest
import tifffile
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import validate as validate_lib
from panoptic_jax.data.dataset import Dataset

META = """\
task: semantic segmentation
annotations: labels/
categories: [road, car, sky]
colors:
  road: [128, 64, 128]
  car: [0, 0, 142]
  sky: [70, 130, 180]
"""
INFO = fmt.parse_metadata(META)
D = INFO.label_divisor


def _label(hw=(6, 8)) -> np.ndarray:
  """A canonical semantic map: sky on top, a car, road below, a void corner."""
  label = np.full(hw, 2 * D, np.int32)
  label[hw[0] // 2:] = 0
  label[hw[0] // 2 - 1:hw[0] // 2 + 1, 2:5] = D
  label[-1, -2:] = fmt.VOID
  return label


def _rgb(label: np.ndarray) -> np.ndarray:
  palette = np.array(INFO.colors + ((0, 0, 0),), np.uint8)
  return palette[np.where(label >= 0, label // D, -1)]


def _png(rgb: np.ndarray, mode: str = "RGB") -> bytes:
  image = Image.fromarray(rgb)
  if mode == "RGBA":
    image.putalpha(255)
  elif mode == "P":
    image = image.quantize(colors=8, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return buffer.getvalue()


def _tiff(pages: list[np.ndarray], planarconfig: str | None = None) -> bytes:
  buffer = io.BytesIO()
  with tifffile.TiffWriter(buffer) as tiff:
    for page in pages:
      tiff.write(page, photometric="rgb", planarconfig=planarconfig)
  return buffer.getvalue()


def test_metadata():
  assert INFO.task == fmt.SEMANTIC_TASK and INFO.is_semantic and INFO.is_thing == (False, False, False)
  assert INFO.annotations == "labels" and INFO.annotation_extensions == (".png", ".tif", ".tiff")
  assert fmt.parse_metadata(fmt.metadata_yaml(INFO)) == INFO
  assert "things" not in fmt.metadata_yaml(INFO)
  with pytest.raises(fmt.FormatError, match=r"m\.yaml: things: a semantic segmentation dataset has no instances"):
    fmt.parse_metadata(META + "things: [car]\n", where="m.yaml")
  with pytest.raises(fmt.FormatError, match="task: expected 'panoptic segmentation' or 'semantic segmentation'"):
    fmt.parse_metadata(META.replace("semantic", "instance"))


@pytest.mark.parametrize("encoding", ["RGB", "RGBA", "P", "tiff channels-last", "tiff channels-first", "ours"])
def test_label_image_encodings_decode_to_the_canonical_map(encoding):
  label = _label()
  rgb = _rgb(label)
  data = {"RGB": lambda: _png(rgb), "RGBA": lambda: _png(rgb, "RGBA"), "P": lambda: _png(rgb, "P"),
          "tiff channels-last": lambda: _tiff([rgb], "contig"),  # [6, 8, 3]: a shape that does not give the layout.
          "tiff channels-first": lambda: _tiff([np.moveaxis(rgb, -1, 0)], "separate"),
          "ours": lambda: fmt.encode_annotation(label, INFO)}[encoding]()
  decoded = fmt.decode_annotation(data, INFO, where="l.png")
  assert decoded.dtype == np.int32 and (decoded == label).all()


def test_smaller_label_is_resized_to_its_image_and_a_wrong_size_is_named():
  label = _label((6, 8))
  data = _png(_rgb(label))
  assert (fmt.decode_annotation(data, INFO, (12, 16)) == label.repeat(2, 0).repeat(2, 1)).all()
  with pytest.raises(fmt.FormatError, match=r"^l\.png: annotation is 6x8 \(aspect 1\.3333\) but its image is 12x24"):
    fmt.decode_annotation(data, INFO, (12, 24), where="l.png")


def test_bad_label_images_are_named():
  rgb = _rgb(_label())
  rgb[0, :3] = (1, 2, 3)
  with pytest.raises(fmt.FormatError, match=r"^l\.png: 1 colours are not in the metadata palette: \[1, 2, 3\] \(3 px"):
    fmt.decode_annotation(_png(rgb), INFO, where="l.png")
  gray = io.BytesIO()
  Image.fromarray(np.zeros((6, 8), np.uint8)).save(gray, format="PNG")
  with pytest.raises(fmt.FormatError, match=r"^l\.png: expected an RGB colour map .* found mode L; a single-channel"):
    fmt.decode_annotation(gray.getvalue(), INFO, where="l.png")
  with pytest.raises(fmt.FormatError, match=r"^l\.tif: expected a single-page RGB colour map, found 2 pages"):
    fmt.decode_annotation(_tiff([_rgb(_label())] * 2), INFO, where="l.tif")
  with pytest.raises(fmt.FormatError, match=r"^l\.png: cannot decode as an image"):
    fmt.decode_annotation(b"\x89PNG garbage", INFO, where="l.png")


def _write(root):
  (root / "images").mkdir(parents=True)
  (root / "labels").mkdir()
  (root / "metadata.yaml").write_text(META)
  for stem, downscale, suffix in [("a", 1, ".png"), ("b", 2, ".png"), ("c", 1, ".tif")]:
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(root / "images" / f"{stem}.jpg")
    rgb = _rgb(_label((12 // downscale, 16 // downscale)))
    (root / "labels" / f"{stem}{suffix}").write_bytes(_png(rgb) if suffix == ".png" else _tiff([rgb]))
  (root / "labels" / "orphan.png").write_bytes(_png(_rgb(_label())))


def test_dataset_lists_png_and_tiff_labels(tmp_path):
  _write(tmp_path)
  dataset = Dataset.open(tmp_path)
  assert [(e.name, e.annotation) for e in dataset.examples] == [("a", "labels/a.png"), ("b", "labels/b.png"),
                                                                 ("c", "labels/c.tif")]
  assert dataset.unpaired_annotations == ["labels/orphan.png"]
  assert (dataset.read_example(1)["panoptic"] == _label((6, 8)).repeat(2, 0).repeat(2, 1)).all()


def test_validate_summarises_pixels_void_share_and_scales(tmp_path, capsys):
  _write(tmp_path)
  assert validate_lib.main([str(tmp_path), "--json", str(tmp_path / "s.json"), "--workers", "0",
                            "--no_progress"]) == 0
  out = capsys.readouterr().out
  summary = json.loads((tmp_path / "s.json").read_text())
  assert summary["task"] == "semantic segmentation" and summary["valid"]
  assert summary["annotation_scales"] == {"1x": 2, "2x": 1} and summary["id_dtypes"] == {}
  # Counted at image resolution: b's half-size label is upscaled to its 12 x 16 image first.
  label = _label((12, 16))
  per_image = {name: int(((label >= 0) & (label // D == k)).sum()) for k, name in enumerate(INFO.categories)}
  b = _label((6, 8)).repeat(2, 0).repeat(2, 1)
  b_pixels = {name: int(((b >= 0) & (b // D == k)).sum()) for k, name in enumerate(INFO.categories)}
  assert summary["categories"] == [
      {"name": n, "color": list(c), "pixels": 2 * per_image[n] + b_pixels[n], "images": 3}
      for n, c in zip(INFO.categories, INFO.colors)]
  void = 2 * int((label == fmt.VOID).sum()) + int((b == fmt.VOID).sum())
  assert summary["void_pixels"] == void and summary["void_share"] == pytest.approx(void / (3 * 12 * 16))
  assert "task: semantic segmentation" in out and "instance-id dtypes" not in out and "kind" not in out

  rgb = _rgb(_label((6, 8)))
  rgb[0, 0] = (9, 9, 9)
  (tmp_path / "labels" / "b.png").write_bytes(_png(rgb))
  (tmp_path / "labels" / "c.tif").write_bytes(_tiff([_rgb(_label((5, 16)))]))
  assert validate_lib.main([str(tmp_path), "--workers", "0", "--no_progress"]) == 1
  out = capsys.readouterr().out
  assert f"{tmp_path}/labels/b.png: 1 colours are not in the metadata palette: [9, 9, 9] (1 px)" in out
  assert f"{tmp_path}/labels/c.tif: annotation is 5x16" in out


def test_training_refuses_a_semantic_dataset(tmp_path):
  """A semantic set has no instances: training on it (or evaluating panoptic quality on it during training) is an
  error naming the field and the command that scores against it, before anything is built."""
  from panoptic_jax.training import config as config_lib
  from tests.training import train_helpers as th
  _write(tmp_path / "semantic")
  with pytest.raises(config_lib.ConfigError, match=r"config.dataset.val: .*semantic-segmentation dataset.*evaluate"):
    th.run_in_process(tmp_path / "run", "train_and_eval", dataset__val=str(tmp_path / "semantic"))
  assert not (tmp_path / "run" / "checkpoints").exists()
