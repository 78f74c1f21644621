"""The training loop: data -> jitted, sharded train step -> checkpoints, logs and periodic evaluation.

State is a plain pytree `{"step", "params", "model_state", "opt_state"}`: `params` are the model's `nnx.Param`s,
`model_state` everything else the model carries (batch statistics, drop-path RNG counters). The train step is one
pure jitted function of (state, batch, rng) with no host callbacks; everything with side effects stays in `run`.
"""

import contextlib
import dataclasses
import functools
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from panoptic_jax import ops
from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import pipeline, storage, synthetic
from panoptic_jax.data.dataset import Dataset
from panoptic_jax.errors import UserError
from panoptic_jax.model import kmax_deeplab, sharding_rules
from panoptic_jax.training import checkpoint, data_health, eval_loop, losses, optim, sharding
from panoptic_jax.training import config as config_lib
from panoptic_jax.training import workdir as workdir_lib
from panoptic_jax.training.metrics_writer import MetricsWriter, Progress
from panoptic_jax.weights import init_from

State = dict[str, Any]


class TrainingError(UserError, RuntimeError):
  """Training cannot go on (non-finite loss, out of memory, too many undecodable samples); the message says why."""


@dataclasses.dataclass(frozen=True)
class ModelDef:
  """The static halves of the model: its graph in train and in eval mode, and its architecture config."""

  train_graph: Any
  eval_graph: Any
  arch: kmax_deeplab.KMaXConfig
  num_classes: int


# ----------------------------------------------------------------------------------------------------------------------
# Datasets


def dataset_locations(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """(train, val) locations; the demo's synthetic dataset is generated on first use."""
  if config.dataset.get("synthetic") is not None and not config.dataset.train:
    spec = config.dataset.synthetic
    root = synthetic.ensure_demo_dataset(spec.cache_dir, num_train=spec.num_train, num_val=spec.num_val,
                                         seed=spec.seed, size=(spec.height, spec.width))
    return str(pathlib.Path(root) / "train"), str(pathlib.Path(root) / "val")
  return config.dataset.train, config.dataset.val


# ----------------------------------------------------------------------------------------------------------------------
# Model and state


def _build(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
  return kmax_deeplab.build_model(config_lib.model_arch(config), num_classes, rngs=nnx.Rngs(config.seed))


def _shard_like_params(opt_state: Any, params: Any, param_shardings: Any, other: Any) -> Any:
  """Shardings for an optax state: subtrees shaped like the parameters (Adam moments) shard like them."""
  params_structure = jax.tree.structure(params)

  def is_params_like(x) -> bool:
    return jax.tree.structure(x) == params_structure

  return jax.tree.map(lambda x: param_shardings if is_params_like(x) else other, opt_state, is_leaf=is_params_like)


def state_layout(config: ml_collections.ConfigDict, num_classes: int, mesh: jax.sharding.Mesh,
                 tx: optax.GradientTransformation) -> tuple[ModelDef, Any, Any]:
  """The state's structure, traced with `eval_shape` (nothing materialised), and how to build it.

  Returns:
    (model definition, `init`: the jitted function that initialises the state in its shardings (`init.eval_shape()`
    gives the abstract state, `jax.ShapeDtypeStruct` leaves carrying their shardings), state shardings).
  """
  abstract = nnx.eval_shape(lambda: _build(config, num_classes))
  abstract.eval()
  eval_graph = nnx.split(abstract)[0]
  abstract.train()
  train_graph, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
  param_shardings = sharding_rules.param_shardings(abstract_params, mesh)
  rest_shardings = sharding_rules.param_shardings(abstract_rest, mesh)

  def init() -> State:
    model = _build(config, num_classes)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": rest, "opt_state": tx.init(params)}

  abstract_state = jax.eval_shape(init)
  replicated = sharding.replicated(mesh)
  opt_shardings = _shard_like_params(abstract_state["opt_state"], abstract_params, param_shardings, replicated)
  shardings = {"step": replicated, "params": param_shardings, "model_state": rest_shardings,
               "opt_state": opt_shardings}
  model_def = ModelDef(train_graph, eval_graph, config_lib.model_arch(config), num_classes)
  # Shardings come from `out_shardings` (which replicate axes the mesh cannot split), not from eager placement.
  return model_def, jax.jit(init, out_shardings=shardings), shardings


def create_state(config: ml_collections.ConfigDict, num_classes: int, mesh: jax.sharding.Mesh,
                 tx: optax.GradientTransformation) -> tuple[ModelDef, State, Any]:
  """Initialises parameters directly in their shardings (no host copy of the full model).

  Returns:
    (model definition, state, state shardings).
  """
  model_def, init, shardings = state_layout(config, num_classes, mesh, tx)
  # Compiled together: a process that finds `init` in the persistent compilation cache would otherwise reach the next
  # collective (Orbax's start-up sync) while another still compiles it, and gloo gives up after 30 s.
  return model_def, sharding.compile_together(init, name="init_state")(), shardings


# ----------------------------------------------------------------------------------------------------------------------
# The train step (pure, jitted)


def train_step(model_def: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
               loss_config: losses.LossConfig, state: State, batch: dict[str, jax.Array], rng: jax.Array
               ) -> tuple[State, dict[str, jax.Array]]:
  """One optimisation step on a global batch; returns the new state and scalar metrics."""

  def loss_fn(params):
    model = nnx.merge(model_def.train_graph, params, state["model_state"], copy=True)
    outputs = model(batch["image"])
    total, terms = losses.kmax_losses(outputs, batch, loss_config, rng)
    return total, (terms, nnx.state(model, nnx.Not(nnx.Param)))

  (loss, (terms, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new_state = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
               "model_state": model_state, "opt_state": opt_state}
  metrics = {**terms, "loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": schedule(state["step"])}
  metrics.update(data_health.batch_counts(batch))  # Global counts: every process takes the same decision to stop.
  return new_state, metrics


def compile_train_step(step_fn, mesh: jax.sharding.Mesh, state: State, batch: dict, rng: jax.Array, *, name: str):
  """`step_fn` (from `jit_train_step`) compiled ahead of time for these arguments, as the loop runs it:
  `sharding.compile_together` with the train step's XLA options for the mesh's platform."""
  return sharding.compile_together(step_fn, state, batch, rng, name=name,
                                   compiler_options=ops.train_step_compiler_options(mesh.devices.flat[0].platform))


def jit_train_step(model_def: ModelDef, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   loss_config: losses.LossConfig, shardings: Any, mesh: jax.sharding.Mesh):
  """`train_step` jitted on `mesh`: the state sharded as `shardings` (and donated), the batch as given."""
  step = functools.partial(train_step, model_def, tx, schedule, loss_config)
  return jax.jit(step, in_shardings=(shardings, None, sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def _oom_hint(error: Exception) -> TrainingError | None:
  text = str(error)
  if "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text:
    return TrainingError(
        f"Out of device memory ({text.splitlines()[0][:200]}). Try --config.model.remat=True (recompute "
        "activations), --config.model.dtype=bfloat16, a smaller --config.input.crop_size, a smaller "
        "--config.train.batch_size, or more devices / --config.mesh.fsdp to shard the parameters.")
  return None


# ----------------------------------------------------------------------------------------------------------------------
# The loop (side effects)


def pipeline_config(config: ml_collections.ConfigDict, arch: kmax_deeplab.KMaXConfig) -> pipeline.PipelineConfig:
  """The input pipeline's settings for a run config and the model it feeds."""
  num_workers = config.input.num_workers if config.input.num_workers >= 0 else os.cpu_count() or 1
  return pipeline.PipelineConfig(
      batch_size=config.train.batch_size, eval_batch_size=config.eval.batch_size,
      augment=config_lib.augment_config(config), num_mask_slots=arch.num_slots, output_stride=arch.output_stride,
      seed=config.seed, num_workers=num_workers, eval_resize=config.input.resize_to_crop)


def _check_finite(history: list[tuple[int, dict]]) -> None:
  for step, metrics in history:
    if not np.isfinite(metrics["loss"]):
      terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
      raise TrainingError(f"Non-finite loss at step {step} ({terms}). Training stopped; the last checkpoint "
                          "(before this step) is intact. Lower --config.optim.base_lr or check the data.")


def _open_datasets(config: ml_collections.ConfigDict, mode: str, run: dict[str, Any] | None
                   ) -> tuple[Dataset | None, Dataset | None, tuple[str, str]]:
  """(train, val) datasets as `mode` needs them, and both locations. The validation set's categories are matched to
  the training set's (or, evaluating a finished run, to those recorded in its workdir) by name."""
  train_location, val_location = dataset_locations(config)
  endpoint = config.dataset.endpoint_url or None
  train = Dataset.open(train_location, endpoint) if mode != "eval" else None
  val = Dataset.open(val_location, endpoint) if mode != "train" else None
  for field, dataset in (("train", train), ("val", val)):
    if dataset is not None and dataset.info.is_semantic:
      raise config_lib.ConfigError(
          f"config.dataset.{field}: {dataset.storage.describe()} is a semantic-segmentation dataset (its metadata.yaml "
          "says task: semantic segmentation); training and its evaluation need panoptic annotations. Score "
          "predictions against it with python -m panoptic_jax.evaluate --gt LOCATION --pred PREDICTIONS")
  if train is not None:
    reference = (train.info.categories, train.info.is_thing, train.storage.describe())
  elif run is not None and run.get("categories"):
    reference = (tuple(run["categories"]), tuple(run["is_thing"]), f"the run's training set ({run['train_location']})")
  else:
    reference = None
  if val is not None and reference is not None:
    val = val.in_label_space(*reference)
  return train, val, (train_location, val_location)


def record_run(wd: workdir_lib.Workdir, config: ml_collections.ConfigDict, locations: tuple[str, str],
               info: fmt.DatasetInfo) -> None:
  """Writes the run's config.json: its config, datasets and the training set's label space (what prediction and
  export rebuild the model's outputs from)."""
  wd.write_run(config, train_location=locations[0], val_location=locations[1], categories=list(info.categories),
               is_thing=list(info.is_thing), colors=[list(c) if c is not None else None for c in info.colors],
               label_divisor=info.label_divisor)


def run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> dict[str, Any]:
  """Trains and / or evaluates as `mode` says; returns the last evaluation's metrics (empty if none).

  Raises:
    WorkdirError: the workdir is in use by another run, holds a run of another config, or (`mode="eval"`) has no
      checkpoint to evaluate.
    CheckpointMismatchError: a checkpoint does not fit the model of `config`.
  """
  storage.set_retry_budget(config.dataset.storage_retry_s)  # Before any worker process starts: they inherit it.
  wd = workdir_lib.Workdir(workdir)
  run_record = wd.read_run()
  has_checkpoint = bool(wd.checkpoint_steps())
  if mode == "eval" and not has_checkpoint:
    raise workdir_lib.WorkdirError(f"--mode=eval: {wd} holds no checkpoint to evaluate (no finished step in "
                                   f"{wd.checkpoints}); train first, or point --workdir at a trained run")
  if not has_checkpoint and mode != "eval" and config.model.init_from:
    init_from.check_source(config.model.init_from, config.dataset.endpoint_url or None)
  if has_checkpoint:
    for change in wd.check_config(config):
      logging.info("Config override for this %s: %s", "evaluation" if mode == "eval" else "resumed run", change)
  # Training owns the workdir; an evaluation only reads its checkpoints (it may run beside the training).
  with wd.lock() if mode != "eval" and jax.process_index() == 0 else contextlib.nullcontext() as lease:
    train_dataset, val_dataset, locations = _open_datasets(config, mode, run_record)
    if train_dataset is not None and jax.process_index() == 0:
      record_run(wd, config, locations, train_dataset.info)
    return _run(config, wd, mode, train_dataset, val_dataset, lease)


def _run(config: ml_collections.ConfigDict, wd: workdir_lib.Workdir, mode: str, train_dataset: Dataset | None,
         val_dataset: Dataset | None, lease: workdir_lib.Lease | None) -> dict[str, Any]:
  info = (train_dataset or val_dataset).info
  input_health = None
  if train_dataset is not None:
    input_health = data_health.InputHealth(train_dataset, config.train.batch_size, config.input.max_skipped_fraction)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")  # Before anything compiles.
  sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
  tx, schedule = optim.make_optimizer(total_steps=config.train.steps, **config.optim)
  model_def, state, shardings = create_state(config, info.num_classes, mesh, tx)
  logging.info("Model %s: %s parameters, mesh %s", config.model.preset,
               f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}", dict(mesh.shape))

  pipeline_settings = pipeline_config(config, model_def.arch)
  train_iter = pipeline.make_train_iterator(train_dataset, pipeline_settings) if train_dataset is not None else None
  checkpointer = checkpoint.Checkpointer(wd.checkpoints, config.train.checkpoint_every,
                                         config.train.keep_checkpoints, writer=mode != "eval")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored = checkpointer.restore(abstract, train_iter)
  if restored is not None:
    state, restored_step = restored
    logging.info("%s the checkpoint at step %d in %s", "Evaluating" if mode == "eval" else "Resumed from",
                 restored_step, wd.checkpoints)
  elif mode == "eval":
    raise workdir_lib.WorkdirError(f"--mode=eval: no checkpoint in {wd.checkpoints} reads back whole (see the "
                                   "warnings above); nothing to evaluate")
  elif config.model.init_from:
    state, report = init_from.initialise(state, config.model.init_from, model_def.arch, info.num_classes,
                                         class_names=info.categories, exclude=config.model.init_from_exclude,
                                         endpoint_url=config.dataset.endpoint_url or None)
    if jax.process_index() == 0:
      init_from.write_report(report, wd)
  # A resumed run writes the steps after its checkpoint again: their earlier rows go (one row per step).
  writer = MetricsWriter(wd.storage, after_step=int(state["step"]) if mode != "eval" else None)
  evaluator = None
  if val_dataset is not None:
    evaluator = eval_loop.ModelEvaluator(config, model_def, val_dataset, mesh, pipeline_settings,
                                           storage.open_storage(wd.url(workdir_lib.VISUALIZATIONS)))
  results: dict[str, Any] = {}
  try:
    if mode == "eval":
      results = evaluator.evaluate(state, int(state["step"]))
      writer.write(int(state["step"]), results["scalars"], prefix="eval/")
      return results
    results = _train_loop(config, model_def, tx, schedule, state, shardings, mesh, train_iter, checkpointer, writer,
                          evaluator if mode == "train_and_eval" else None, input_health, lease)
  finally:
    checkpointer.close()
    writer.close()
    if train_iter is not None and hasattr(train_iter, "close"):
      train_iter.close()
  return results


def _train_loop(config, model_def, tx, schedule, state, shardings, mesh, train_iter, checkpointer, writer,
                evaluator, input_health: data_health.InputHealth, lease: workdir_lib.Lease | None) -> dict[str, Any]:
  loss_config = losses.LossConfig(**config.loss)
  step_fn = jit_train_step(model_def, tx, schedule, loss_config, shardings, mesh)
  base_rng = jax.random.key(config.seed)
  total = config.train.steps
  step = int(state["step"])
  progress = Progress(total, config.train.batch_size, step)
  pending: list[tuple[int, dict]] = []  # Device metrics since the last host check (no per-step host sync).
  guard = checkpoint.PreemptionGuard()
  results: dict[str, Any] = {}
  compiled = None
  with guard.installed():
    while step < total:
      local_batch = next(train_iter)
      input_health.note_batch(local_batch)  # Names the files of this process's rows that failed to decode.
      batch = sharding.global_batch(local_batch, mesh)
      rng = jax.random.fold_in(base_rng, step)  # A function of the step: resumed runs draw the same samples.
      try:
        if compiled is None:
          compiled = compile_train_step(step_fn, mesh, state, batch, rng, name=f"train_step_{step}")
          progress.restart(step)
        state, metrics = compiled(state, batch, rng)
      except Exception as e:  # XLA reports out-of-memory as a generic runtime error.
        hint = _oom_hint(e)
        if hint is None:
          raise
        raise hint from e
      step += 1
      pending.append((step, metrics))
      stop = guard.requested()
      save_due = checkpointer.every > 0 and step % checkpointer.every == 0
      if step % config.train.log_every == 0 or save_due or stop or step == total:
        history = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        pending.clear()
        _check_finite(history)
        counts = input_health.take_counts(history)  # Sums over the window, not means; off the progress line.
        last_step, last = history[-1]
        means = {k: float(np.mean([m[k] for _, m in history])) for k in last}
        means["learning_rate"] = last["learning_rate"]
        writer.write(last_step, {**means, **counts}, prefix="train/")
        progress.log(last_step, means)
        problem = input_health.check(last_step, counts, len(history))
        if problem is not None:
          raise TrainingError(problem)
      if save_due or stop or step == total:
        if lease is not None:
          lease.check()  # A run whose workdir another run has taken over must not write into it.
        checkpointer.save(step, state, train_iter, force=True)
      if stop:
        logging.warning("Stopped at step %d after a stop signal; the checkpoint is saved. Rerun the same "
                        "command to resume.", step)
        checkpointer.wait()
        return results
      if evaluator is not None and (step % config.train.eval_every == 0 or step == total):
        results = evaluator.evaluate(state, step)
        writer.write(step, results["scalars"], prefix="eval/")
        progress.restart(step)
  return results
