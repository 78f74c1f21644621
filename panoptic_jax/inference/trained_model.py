"""A trained model from its workdir: the run's own config, its categories and one checkpoint's weights.

    model = trained_model.load("runs/demo")           # the newest checkpoint; step=N for another
    model.step, model.info.categories, model.spec.crop_size
    forward = model.forward()                         # images uint8 [B, h, w, 3] -> predict.predict's outputs

Nothing is passed again: the architecture, the merge thresholds and the inference size come from the workdir's
`config.json`, the categories, colours and label divisor from the record of its training set. Only the parameters
and batch statistics are read from the checkpoint, replicated on the local devices; the optimizer state stays on
disk.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.inference import postprocess, predict
from panoptic_jax.inference.spec import ModelSpec
from panoptic_jax.model import kmax_deeplab
from panoptic_jax.training import checkpoint
from panoptic_jax.training import config as config_lib
from panoptic_jax.training import workdir as workdir_lib


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """A model rebuilt from its workdir, with one checkpoint's weights.

  Attributes:
    workdir: where it was trained.
    step: the checkpoint's step.
    config: the run's config (`config.json`).
    spec: categories, inference size and merge thresholds (what an exported artifact's manifest records).
    graph: the model's graph in eval mode.
    params, model_state: the weights (replicated over `mesh`).
    mesh: the local devices, one axis "data" (prediction splits its batches over it).
  """

  workdir: str
  step: int
  config: ml_collections.ConfigDict
  spec: ModelSpec
  graph: nnx.GraphDef
  params: nnx.State
  model_state: nnx.State
  mesh: jax.sharding.Mesh

  @property
  def info(self) -> fmt.DatasetInfo:
    return self.spec.info

  def model(self) -> nnx.Module:
    """The model in eval mode (a copy sharing nothing with the stored weights)."""
    return nnx.merge(self.graph, self.params, self.model_state, copy=True)

  def forward(self) -> Callable[[np.ndarray], dict[str, jax.Array]]:
    """images uint8 [B, h, w, 3] (B a multiple of the local device count) -> `predict.predict`'s outputs, jitted with
    the batch split over the local devices."""
    batch = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
    fn = jax.jit(functools.partial(predict.predict, self.graph, config=self.spec.postprocess,
                                   label_divisor=self.info.label_divisor),
                 in_shardings=(None, None, batch, None), out_shardings=batch)
    params, model_state, is_thing = self.params, self.model_state, jnp.asarray(self.info.is_thing, bool)
    return lambda images: fn(params, model_state, images, is_thing)


def _info(record: dict[str, Any], where: str) -> fmt.DatasetInfo:
  """The training set's categories as the run recorded them; colours of runs recorded before they were kept come
  from the training set's metadata.yaml when it can still be read, else from a generated palette."""
  categories, is_thing = tuple(record["categories"]), tuple(bool(t) for t in record["is_thing"])
  colors = record.get("colors")
  label_divisor = int(record.get("label_divisor", fmt.DEFAULT_LABEL_DIVISOR))
  if colors is None:
    from panoptic_jax.data.dataset import read_metadata  # Only for runs recorded before colours were.
    from panoptic_jax.data.storage import open_storage
    try:
      train = read_metadata(open_storage(record["train_location"]))
      train = fmt.in_label_space(train, categories, is_thing, record["train_location"], where)
      return fmt.DatasetInfo(train.categories, train.colors, train.is_thing, label_divisor=train.label_divisor)
    except Exception as e:  # Any failure to read it leaves the generated palette: prediction still works.
      logging.warning("%s records no category colours and the training set's metadata does not read (%s); "
                      "predictions are drawn in generated colours", where, e)
      colors = [_generated_color(k) for k in range(len(categories))]
  return fmt.DatasetInfo(categories, tuple(tuple(c) if c is not None else None for c in colors), is_thing,
                         label_divisor=label_divisor)


def _generated_color(k: int) -> tuple[int, int, int]:
  """A distinct, non-black colour for category k (golden-ratio hues)."""
  import colorsys
  r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.65, 0.95)
  return int(r * 255), int(g * 255), int(b * 255)


def load(workdir: str, step: int | None = None, devices: list | None = None, dtype: str | None = None,
         crop_size: tuple[int, int] | None = None) -> TrainedModel:
  """Rebuilds the run's model and reads one checkpoint's weights onto `devices` (default: the local devices).

  Args:
    workdir: a training run's workdir.
    step: the checkpoint's step (None: the newest that reads back whole).
    devices: where the weights go (replicated) and prediction runs.
    dtype: compute dtype ("float32" / "bfloat16") instead of the run's `model.dtype`; parameters stay float32.
    crop_size: the inference size (h, w) instead of the run's `input.crop_size` (sides of 32 k + 1).

  Raises:
    WorkdirError: the workdir holds no run (no config.json) or no checkpoint that reads back.
    CheckpointNotFoundError: no checkpoint at `step`.
    CheckpointMismatchError: the checkpoint does not fit the recorded config.
    ConfigError: a `crop_size` whose sides are not of the form 32 k + 1.
  """
  wd = workdir_lib.Workdir(workdir)
  record = wd.read_run()
  if record is None:
    raise workdir_lib.WorkdirError(f"{wd} holds no trained run (no {workdir_lib.CONFIG}); pass the --workdir of a "
                                   "training run")
  where = wd.url(workdir_lib.CONFIG)
  config = config_lib.from_record(record, where)
  if not record.get("categories"):
    raise workdir_lib.WorkdirError(f"{where}: no categories recorded; the run never opened its training set")
  if not wd.checkpoint_steps():
    raise workdir_lib.WorkdirError(f"{wd} holds no checkpoint (no finished step in {wd.checkpoints}); train first")
  info = _info(record, where)
  if dtype is not None:
    config.model.dtype = dtype
  if crop_size is not None:
    config.input.crop_size = tuple(crop_size)
    config_lib.validate(config, needs_train_data=False)
  mesh = jax.sharding.Mesh(np.array(devices or jax.local_devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  arch = config_lib.model_arch(config)
  abstract = nnx.eval_shape(lambda: kmax_deeplab.build_model(arch, info.num_classes, rngs=nnx.Rngs(config.seed)))
  abstract.eval()
  graph, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        {"params": abstract_params, "model_state": abstract_rest})
  checkpointer = checkpoint.Checkpointer(wd.checkpoints, every=0, keep=1, writer=False)
  try:
    restored = checkpointer.restore(target, step=step)
  finally:
    checkpointer.close()
  if restored is None:
    raise workdir_lib.WorkdirError(f"{wd.checkpoints}: no checkpoint reads back whole (see the warnings above)")
  state, restored_step = restored
  spec = ModelSpec(info=info, crop_size=tuple(config.input.crop_size), resize_to_crop=bool(config.input.resize_to_crop),
                   postprocess=postprocess.get_preset(config.eval.postprocess))
  return TrainedModel(str(wd), restored_step, config, spec, graph, state["params"], state["model_state"], mesh)
