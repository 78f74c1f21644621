"""A Grain random-access source over a dataset in the project's format (local folder or S3).

    source = PanopticSource(Dataset.open("s3://bucket/cityscapes/train", endpoint_url=...))
    len(source), source[0]   # {"image": uint8 [H, W, 3], "panoptic": int32 [H, W], "name": "000", "index": 0}

The source holds the opened Dataset (names and metadata only). It pickles cheaply: the dataset's storage drops its
s3fs client when pickled and builds a new one lazily in each process, so Grain worker processes (forked or spawned)
each get their own connection pool.
"""

from __future__ import annotations

import os

import grain

from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.storage import Storage


class PanopticSource(grain.sources.RandomAccessDataSource):
  """index -> {"image": uint8 [H, W, 3], "panoptic": int32 [H, W], "name": str, "index": int}.

  "panoptic" is the canonical map (dataset_format.py) at the image's size; "index" is the example's position in
  `dataset.examples` (so batches can name their images without carrying strings).
  """

  def __init__(self, dataset: Dataset | str | os.PathLike | Storage, endpoint_url: str | None = None):
    """Args: an opened Dataset, or a location (folder, s3://bucket/prefix) and endpoint to open one from."""
    if not isinstance(dataset, Dataset):
      dataset = Dataset.open(dataset, endpoint_url)
    if any(e.image is None for e in dataset.examples):
      raise ValueError(f"{dataset.storage.describe()}: a training / evaluation source needs an image for every "
                       "example; open the dataset with require_images=True")
    self.dataset = dataset

  @property
  def info(self):
    return self.dataset.info

  @property
  def names(self) -> list[str]:
    return self.dataset.names

  def __len__(self) -> int:
    return len(self.dataset.examples)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples of {self.dataset.storage.describe()}")
    index %= len(self)
    element = self.dataset.read_example(index)
    element["index"] = index
    return element

  def __repr__(self) -> str:
    return f"PanopticSource({self.dataset!r})"
