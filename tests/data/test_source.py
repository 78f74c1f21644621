"""PanopticSource: index -> decoded example, from a local folder and from S3; picklable."""

import pathlib
import pickle

import numpy as np
import pytest

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.source import PanopticSource

INFO = fmt.DatasetInfo(categories=("road", "sky", "car"), colors=((128, 64, 128), (70, 130, 180), (0, 0, 142)),
                       is_thing=(False, False, True))


def _example(i: int, h: int = 24, w: int = 36):
  rng = np.random.default_rng(i)
  pan = np.full((h, w), 1 * INFO.label_divisor, np.int32)
  pan[h // 2:] = 0
  for k in range(1 + i % 3):
    y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
    pan[y:y + 5, x:x + 5] = 2 * INFO.label_divisor + k + 1
  pan[0, :] = fmt.VOID
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  return image, pan


def write_dataset(root: pathlib.Path, n: int, write=None) -> list:
  """Writes n examples (PNG images, so pixels survive exactly); returns [(image, panoptic)]."""
  if write is None:
    def write(relpath, data):
      path = root / relpath
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data)
  examples = []
  for i in range(n):
    image, pan = _example(i)
    write(f"images/{i:03d}.png", fmt.encode_image(image, ".png"))
    write(f"panoptic_maps/{i:03d}.tif", fmt.encode_annotation(pan, INFO))
    examples.append((image, pan))
  write("metadata.yaml", fmt.metadata_yaml(INFO).encode())
  return examples


def _check(source, examples):
  assert len(source) == len(examples)
  for i, (image, pan) in enumerate(examples):
    element = source[i]
    assert set(element) == {"image", "panoptic", "name", "index"}
    assert element["name"] == f"{i:03d}" and element["index"] == i
    assert element["image"].dtype == np.uint8 and element["panoptic"].dtype == np.int32
    np.testing.assert_array_equal(element["image"], image)
    np.testing.assert_array_equal(element["panoptic"], pan)


def test_local_source_reads_examples(tmp_path):
  examples = write_dataset(tmp_path, 4)
  source = PanopticSource(Dataset.open(tmp_path))
  _check(source, examples)
  assert source.info == INFO and source.names == ["000", "001", "002", "003"]
  assert source[-1]["index"] == 3
  with pytest.raises(IndexError, match="out of range for 4 examples"):
    source[4]
  _check(pickle.loads(pickle.dumps(source)), examples)


def test_source_opens_a_location(tmp_path):
  examples = write_dataset(tmp_path, 2)
  _check(PanopticSource(str(tmp_path)), examples)


def test_s3_source_reads_examples_and_pickles(s3_bucket, s3_server):
  fs = s3_server.filesystem()
  examples = write_dataset(None, 3, write=lambda relpath, data: fs.pipe_file(f"{s3_bucket}/ds/{relpath}", data))
  source = PanopticSource(Dataset.open(f"s3://{s3_bucket}/ds", endpoint_url=s3_server.endpoint_url))
  _check(source, examples)
  restored = pickle.loads(pickle.dumps(source))  # A fresh client is built lazily after unpickling.
  _check(restored, examples)
  assert s3_server.secret_key.encode() not in pickle.dumps(source)
