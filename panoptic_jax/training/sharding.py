"""The device mesh, the batch sharding and the logical-axis rules: one code path from 1 CPU to a TPU pod.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose parameters and optimizer state are
also sharded). The batch is split over both; parameters follow the model's logical axis names through `rules`.
"""

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from panoptic_jax.errors import UserError
from panoptic_jax.model.sharding_rules import MESH_AXES

BATCH_AXES = MESH_AXES  # The batch dimension is split over every mesh axis.


class ShardingError(UserError, ValueError):
  """A mesh or batch size that the devices cannot realise; the message names the config field."""


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves -1 (the remaining devices) in `mesh.data` / `mesh.fsdp` and checks the product."""
  if data == -1 and fsdp == -1:
    raise ShardingError("config.mesh: at most one of data and fsdp may be -1; found both")
  for name, size in (("data", data), ("fsdp", fsdp)):
    if size == 0 or size < -1:
      raise ShardingError(f"config.mesh.{name}: expected a positive size or -1, found {size}")
  known = math.prod(s for s in (data, fsdp) if s != -1)
  if num_devices % known:
    raise ShardingError(f"config.mesh: data={data} x fsdp={fsdp} does not divide the {num_devices} devices")
  shape = tuple(num_devices // known if s == -1 else s for s in (data, fsdp))
  if math.prod(shape) != num_devices:
    raise ShardingError(f"config.mesh: data={shape[0]} x fsdp={shape[1]} = {math.prod(shape)} devices, "
                        f"but {num_devices} are available")
  return shape


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh over all devices of all processes (Auto axes: XLA propagates shardings)."""
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if devices is None:  # jax.make_mesh orders devices along the physical topology (TPU ICI rings).
    return jax.make_mesh(mesh_shape(data, fsdp, jax.device_count()), MESH_AXES, axis_types=axis_types)
  shape = mesh_shape(data, fsdp, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension split over every mesh axis, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, field: str = "config.train.batch_size") -> int:
  """Returns the per-process batch size; raises if the devices or processes cannot split the batch evenly."""
  num_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if global_batch_size % num_shards:
    raise ShardingError(f"{field}: {global_batch_size} images cannot be split evenly over {num_shards} devices "
                        f"(mesh {dict(mesh.shape)}); use a multiple of {num_shards}")
  if global_batch_size % jax.process_count():
    raise ShardingError(f"{field}: {global_batch_size} images cannot be split over {jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's numpy batch into global arrays sharded over the batch axes (host-only keys dropped)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
          for k, v in local_batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def compile_together(jitted, *args, name: str, compiler_options: dict[str, str] | None = None):
  """Compiles `jitted` for `args` (with XLA `compiler_options`) ahead of time, then waits until every process has
  compiled it.

  Processes compile at different speeds; the first collective of a step would otherwise wait for the slowest
  compile inside its transport (gloo on CPU gives up after a fixed 30 s). The barrier is on the coordination
  service instead, with a generous timeout.
  """
  compiled = jitted.lower(*args).compile(compiler_options)
  if jax.process_count() > 1:
    from jax._src import distributed  # The coordination-service client; public JAX has no barrier API for it.

    distributed.global_state.client.wait_at_barrier(f"panoptic_jax_compiled_{name}", 3600 * 1000)
  return compiled
