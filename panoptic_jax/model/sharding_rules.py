"""Logical axis names of every model parameter and the default rules that map them to mesh axes.

Names (the complete set used by `panoptic_jax.model`):

| name       | where                                                                 | default mesh axis |
|------------|-----------------------------------------------------------------------|-------------------|
| conv_h     | kernel height of k x k convolutions                                   | None              |
| conv_w     | kernel width of k x k convolutions                                    | None              |
| conv_in    | input channels of convolutions and 1x1 (dense) projections            | None              |
| conv_out   | output channels of convolutions and 1x1 (dense) projections, biases   | fsdp              |
| mlp        | hidden width of ConvNeXt / transformer FFN expansions (output side)   | fsdp              |
| classes    | output channels of class / semantic logits (133+1 is not divisible)   | None              |
| norm       | BatchNorm / LayerNorm scale and bias, layer scale                     | None              |
| embed      | channel axis of embedding tables (cluster centres, relative positions) | None             |
| clusters   | the mask-slot axis of the learnable cluster centres                   | None              |
| relpos     | the relative-distance axis of axial-attention position tables         | None              |

The mesh has the axes `MESH_AXES`: `data` (pure data parallelism) and `fsdp` (data parallelism whose parameters are
also sharded). FSDP shards the output-channel axis of every large kernel over `fsdp`; the training code splits the
batch over both axes. Use `param_shardings` to turn a model's state into `NamedSharding`s: it
replicates any axis whose size does not divide the mesh axis size (jit arguments must divide evenly).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

CONV_H = "conv_h"
CONV_W = "conv_w"
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
MLP = "mlp"
CLASSES = "classes"
NORM = "norm"
EMBED = "embed"
CLUSTERS = "clusters"
RELPOS = "relpos"

DATA = "data"
FSDP = "fsdp"
MESH_AXES = (DATA, FSDP)

# Logical name -> mesh axis (or None = replicated).
DEFAULT_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    (CONV_H, None),
    (CONV_W, None),
    (CONV_IN, None),
    (CONV_OUT, FSDP),
    (MLP, FSDP),
    (CLASSES, None),
    (NORM, None),
    (EMBED, None),
    (CLUSTERS, None),
    (RELPOS, None),
)


def _mesh_axis_size(mesh: Mesh, axis: Any) -> int:
  if axis is None:
    return 1
  if isinstance(axis, (tuple, list)):
    n = 1
    for a in axis:
      n *= mesh.shape[a]
    return n
  return mesh.shape[axis]


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_AXIS_RULES) -> P:
  """PartitionSpec for one array; axes whose size is not divisible by the mesh axis size stay replicated, and a
  mesh axis is used at most once."""
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, size in zip(names, shape):
    axis = table.get(name) if name is not None else None
    if axis is not None:
      members = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
      members = tuple(a for a in members if a in mesh.shape)
      if not members or used.intersection(members) or size % _mesh_axis_size(mesh, members) != 0:
        axis = None
      else:
        used.update(members)
        axis = members if len(members) > 1 else members[0]
    out.append(axis)
  return P(*out)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_AXIS_RULES):
  """`NamedSharding` for every variable in `state` (an `nnx.State`, abstract or concrete), from its logical names.

  Variables without names (BatchNorm statistics, RNG counters) are replicated.
  """

  def one(var):
    value = var.get_value() if hasattr(var, "get_value") else var[...]
    shape = getattr(value, "shape", ())
    names = var.get_metadata().get("out_sharding") or var.get_metadata().get("sharding_names")
    if not names or len(names) != len(shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
