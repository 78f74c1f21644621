"""Grain input pipelines: shuffled, augmented, process-sharded, checkpointable train batches; one-pass eval batches.

    config = PipelineConfig(batch_size=32, augment=transforms.AugmentConfig(crop_size=(1025, 2049)), num_mask_slots=256,
                            output_stride=2, seed=0)
    train = make_train_iterator(Dataset.open("s3://bucket/cityscapes/train"), config)
    batch = next(train)                     # numpy arrays, this process's share of the global batch
    state = train.get_state()               # small dict; or grain.checkpoint.CheckpointSave(train) with Orbax
    global_batch = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)

Batches (leading dimension b = batch_size // process_count, the per-process batch):
  "image"            uint8 [b, H, W, 3]   (H, W) = crop_size; padding PAD_PIXEL (128)
  "panoptic"         int32 [b, H, W]      canonical map at input resolution; padding VOID (-1)
  "semantic"         int32 [b, h, w]      category at the output stride, -1 void; h = (H - 1) // stride + 1
  "slot_ids"         int32 [b, h, w]      mask slot per pixel at the output stride, -1 void / dropped segment
  "slot_classes"     int32 [b, N]         category of each mask slot, -1 for unused slots
  "dropped_segments" int32 [b]            segments that did not fit in N slots (normally 0)
  "valid"            bool  [b]            False for a train sample that failed to decode and the eval padding
  "index"            int32 [b]            example index in the dataset (names: dataset.examples[i].name), -1 padding
  eval only:
  "content_hw"       int32 [b, 2]         extent of the resized image inside the padded crop ([0, 0] for padding)
  "original_hw"      int32 [b, 2]         the image's size on disk ([0, 0] for padding)
Targets and augmentation are documented in transforms.py.

Order and sharding. Train: the dataset is shuffled per epoch from `seed` (EpochShuffle: endless epochs),
augmented with a generator seeded by (seed, position in that global stream), and process p of P takes rows
p * b .. (p + 1) * b - 1 of every global batch of P * b (`ProcessRows`). Hence global batch k holds the same images,
in the same order, with the same augmentation for any number of processes, and for any number of workers (workers
split whole batches). Eval: no shuffle, no augmentation; the examples are padded with blanks (valid False) to a
multiple of P * b and split the same way; every image is evaluated exactly once across processes and every process
yields the same number of batches.

Undecodable files. Train: a sample whose image or annotation fails to decode (a truncated JPEG, a corrupt TIFF:
any dataset_format.FormatError) becomes a blank (all-void labels, `valid` False, its `index` kept) and a warning
naming the file and the error is logged once per file and process; the batch keeps its shape and the stream its
order, so determinism and resume are unaffected, and the losses leave the blank out. The training loop counts and
names these samples and stops past a threshold (training/data_health.py). Storage errors (a file that cannot be
read at all) still raise. Eval: an undecodable file raises a FormatError naming it, since metrics over fewer images
would not be comparable with other evaluations of the same set.

Workers: `num_workers > 0` runs the pipeline in that many spawned processes (`mp_prefetch`); each builds its own
storage client. Grain 0.2.18's mp_prefetch needs absl flags to count as parsed; this module marks them parsed when
no absl app did, so callers need not know. Close iterators with workers (`it.close()`) when done.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import threading

import grain
import numpy as np

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import transforms
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.data.source import PanopticSource


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Input pipeline settings (plain values; the ml_collections config maps onto these fields).

  Attributes:
    batch_size: global train batch size (all processes together); must divide by the process count.
    augment: crop size, scale range, flip, photometric jitter and resize backend (transforms.AugmentConfig).
    photometric: apply the brightness / contrast / saturation / hue jitter.
    num_mask_slots: N, mask slots per image (kMaX: 128 COCO, 256 Cityscapes).
    output_stride: the model's output stride (targets are `label[::stride, ::stride]`).
    seed: seeds the shuffle and the augmentation.
    num_workers: worker processes (0: in this process).
    read_threads: threads per process reading and transforming batches (overlaps storage latency).
    prefetch_batches: batches read ahead per process (and buffered per worker).
    eval_batch_size: global eval batch size (default batch_size).
    eval_crop_size: (height, width) of eval inputs (default: the train crop size).
    eval_resize: scale eval images to fit the eval crop (False: pad only; the image must fit).
  """

  batch_size: int = 16
  augment: transforms.AugmentConfig = transforms.AugmentConfig()
  photometric: bool = True
  num_mask_slots: int = 128
  output_stride: int = 4
  seed: int = 0
  num_workers: int = 0
  read_threads: int = 2
  prefetch_batches: int = 2
  eval_batch_size: int | None = None
  eval_crop_size: tuple[int, int] | None = None
  eval_resize: bool = True

  def __post_init__(self):
    if self.eval_crop_size is not None:
      object.__setattr__(self, "eval_crop_size", tuple(int(v) for v in self.eval_crop_size))
    for name in ("batch_size", "num_mask_slots", "output_stride", "prefetch_batches"):
      if getattr(self, name) < 1:
        raise ValueError(f"PipelineConfig.{name}: expected a positive integer, found {getattr(self, name)}")
    if self.eval_batch_size is not None and self.eval_batch_size < 1:
      raise ValueError(f"PipelineConfig.eval_batch_size: expected a positive integer, found {self.eval_batch_size}")
    for name in ("num_workers", "read_threads"):
      if getattr(self, name) < 0:
        raise ValueError(f"PipelineConfig.{name}: expected an integer >= 0, found {getattr(self, name)}")

  def targets(self, info: fmt.DatasetInfo) -> transforms.TargetConfig:
    return transforms.TargetConfig.from_info(info, self.num_mask_slots, self.output_stride)


# ----------------------------------------------------------------------------------------------------------------------


def _as_source(data) -> tuple[grain.sources.RandomAccessDataSource, fmt.DatasetInfo]:
  if isinstance(data, Dataset):
    data = PanopticSource(data)
  info = getattr(data, "info", None)
  if not isinstance(info, fmt.DatasetInfo):
    raise TypeError(f"expected a Dataset, a PanopticSource or a source with a DatasetInfo `.info`; found "
                    f"{type(data).__name__}")
  if len(data) == 0:
    raise ValueError(f"{data!r}: the dataset has no examples")
  return data, info


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only when the caller leaves sharding to JAX)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  return process_index, process_count


def _per_process(batch_size: int, process_count: int, what: str) -> int:
  if batch_size % process_count:
    raise ValueError(f"{what} {batch_size} does not divide evenly over {process_count} processes; choose a "
                     f"multiple of {process_count}")
  return batch_size // process_count


def _mark_absl_flags_parsed() -> None:
  """Grain 0.2.18's mp_prefetch reads an absl flag and raises UnparsedFlagAccessError outside `absl.app.run`."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _to_iterator(ds: grain.MapDataset, config: PipelineConfig) -> grain.DatasetIterator:
  read = grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_batches)
  it_ds = ds.to_iter_dataset(read)
  if config.num_workers > 0:
    _mark_absl_flags_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers,
                                                           per_worker_buffer_size=config.prefetch_batches))
  return iter(it_ds)


class EpochShuffle(grain.MapDataset):
  """Endless epochs of the parent dataset, each in its own order: a numpy permutation per epoch, seeded by
  (seed, epoch) and cached (the last two epochs, for prefetching across a boundary).

  Same role as `MapDataset.shuffle(seed).repeat()`, whose per-element Feistel shuffle (Grain 0.2.18) costs a
  noticeable share of an image's decode; a cached permutation costs microseconds.
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = int(seed)
    self._lock = threading.Lock()
    self._permutations: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"EpochShuffle(seed={self._seed})"

  def __getstate__(self):
    state = self.__dict__.copy()
    state.update(_lock=None, _permutations={})
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._permutations.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
        self._permutations = {e: p for e, p in self._permutations.items() if e == epoch - 1}
        self._permutations[epoch] = perm
      return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, position = divmod(index, len(self._parent))
    return self._parent[int(self.permutation(epoch)[position])]


class WithPartner(grain.MapDataset):
  """Each element of the stream with a "partner": another element of the source, drawn uniformly with a generator
  seeded by (seed, stream position), for panoptic copy-paste (transforms.paste_segments). Reproducible and resumable
  like the stream itself; a partner may be the element itself, as in the PyTorch port."""

  def __init__(self, parent: grain.MapDataset, source: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._source, self._seed = source, int(seed)

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"WithPartner(seed={self._seed})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    partner = int(np.random.default_rng([self._seed, int(index)]).integers(len(self._source)))
    return {**self._parent[index], "partner": self._source[partner]}


class ProcessRows(grain.MapDataset):
  """Process p's rows of every global batch of size B = P * b: stream positions k * B + p * b + j for j < b.

  Concatenating the processes' batches in process order (as `jax.make_array_from_process_local_data` does over a
  mesh whose devices are ordered by process) therefore gives exactly the batch a single process would read.
  """

  def __init__(self, parent: grain.MapDataset, per_process: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._per_process, self._index, self._count = per_process, process_index, process_count

  def __len__(self) -> int:
    return len(self._parent) // (self._per_process * self._count) * self._per_process

  def __str__(self) -> str:
    return f"ProcessRows(process {self._index} of {self._count}, {self._per_process} rows)"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, self._per_process)
    return self._parent[(batch * self._count + self._index) * self._per_process + row]


def _seeds(seed: int) -> tuple[int, int, int]:
  """The shuffle's, the augmentation's and the copy-paste partners' seeds."""
  return tuple(int(s) for s in np.random.SeedSequence(seed).generate_state(3))


class _SkipUndecodable(grain.sources.RandomAccessDataSource):
  """The source, with an element that fails to decode replaced by {"index": i, "decode_error": message}.

  TrainTransform turns such an element into a blank with `valid` False. Only dataset_format.FormatError (the file was
  read but does not decode or follow the format) is caught; storage errors propagate.
  """

  def __init__(self, source):
    self.source = source
    self._warned: set[int] = set()  # Indices already logged by this process (each worker keeps its own copy).

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return repr(self.source)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    try:
      return self.source[index]
    except fmt.FormatError as e:
      if index not in self._warned:
        self._warned.add(index)
        logging.warning("training example %d: %s; skipped: it becomes a blank sample (valid False) that the losses "
                        "leave out, counted in train/skipped_samples", index, e)
      return {"index": index, "decode_error": str(e)}


def train_dataset(data, config: PipelineConfig, process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """The infinite train MapDataset of per-process batches (what `make_train_iterator` iterates)."""
  source, info = _as_source(data)
  process_index, process_count = _process(process_index, process_count)
  per_process = _per_process(config.batch_size, process_count, "batch_size")
  shuffle_seed, augment_seed, partner_seed = _seeds(config.seed)
  transform = transforms.TrainTransform(config.augment, config.targets(info), photometric=config.photometric)
  examples = grain.MapDataset.source(_SkipUndecodable(source))
  ds = EpochShuffle(examples, shuffle_seed)
  if config.augment.copy_paste:
    ds = WithPartner(ds, examples, partner_seed)
  ds = ds.random_map(transform, seed=augment_seed)  # Before sharding: seeded by the position in the global stream.
  ds = ProcessRows(ds, per_process, process_index, process_count)
  return ds.batch(per_process, drop_remainder=True)


def make_train_iterator(data, config: PipelineConfig, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of this process's train batches.

  Args:
    data: a Dataset, a PanopticSource, or another random-access source with a DatasetInfo `.info`.
    config: the pipeline settings.
    process_index, process_count: this process's shard (default: jax.process_index() / jax.process_count()).

  Returns:
    A grain DatasetIterator (get_state / set_state; Orbax: grain.checkpoint.CheckpointSave / CheckpointRestore)
    yielding dicts of numpy arrays (module docstring).
  """
  return _to_iterator(train_dataset(data, config, process_index, process_count), config)


class _PaddedSource(grain.sources.RandomAccessDataSource):
  """The source followed by `total - len(source)` blanks ({"index": -1}); an undecodable file raises FormatError."""

  def __init__(self, source, total: int):
    self.source = source
    self.total = total

  def __len__(self) -> int:
    return self.total

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if index < len(self.source):
      try:
        element = dict(self.source[index])
      except fmt.FormatError as e:
        raise fmt.FormatError(
            f"{e}. Evaluation reads every image of the set (metrics over fewer images would not be comparable with "
            "other evaluations): fix or remove this file; `python -m panoptic_jax.data.validate LOCATION` lists "
            "every undecodable file of a dataset") from None
      element.setdefault("index", index)
      return element
    return {"index": -1}


def eval_dataset(data, config: PipelineConfig, process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
  """The one-pass eval MapDataset of per-process batches (what `make_eval_iterator` iterates)."""
  source, info = _as_source(data)
  process_index, process_count = _process(process_index, process_count)
  batch_size = config.eval_batch_size or config.batch_size
  per_process = _per_process(batch_size, process_count, "eval_batch_size")
  step = per_process * process_count
  total = math.ceil(len(source) / step) * step
  transform = transforms.EvalTransform(config.eval_crop_size or config.augment.crop_size, config.targets(info),
                                       resize=config.eval_resize, backend=config.augment.backend)
  ds = ProcessRows(grain.MapDataset.source(_PaddedSource(source, total)), per_process, process_index, process_count)
  return ds.map(transform).batch(per_process, drop_remainder=True)


def num_eval_batches(num_examples: int, config: PipelineConfig, process_count: int | None = None) -> int:
  """Batches every process yields in one eval pass over `num_examples` examples."""
  if process_count is None:
    _, process_count = _process(None, None)
  batch_size = config.eval_batch_size or config.batch_size
  _per_process(batch_size, process_count, "eval_batch_size")
  return math.ceil(num_examples / batch_size)


def make_eval_iterator(data, config: PipelineConfig, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
  """One pass over the dataset in order, this process's share, padded so that every image counts exactly once.

  Returns:
    A grain DatasetIterator of dicts of numpy arrays (module docstring), `num_eval_batches` of them; blanks have
    valid False, index -1 and all-void labels.
  """
  return _to_iterator(eval_dataset(data, config, process_index, process_count), config)
