"""Importing weights into a model: which scheme a file follows, what fills what, the class rows, and the report.

    tensors = readers.read_tensors("convnext_base_22k_1k_384.pth")
    values, report = plan(tensors, variables(abstract_state), arch, num_classes, class_names=names)
    state = assign(state, values)
    print(report.summary())

Every variable of the model is either filled from the file or left at its initialisation, and every tensor of the
file is either used, unused by design (a classifier, `num_batches_tracked`), or an error. A missing tensor or a
shape that does not fit is an error naming both sides: the file is of another model than the preset.

Class-dependent tensors (the class heads and the auxiliary semantic classifier, last axis K + 1 with void last)
are matched by category name: rows of categories the file knows are copied (reordered when permuted), rows of new
categories keep their initialisation, and void maps to void.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from panoptic_jax.errors import UserError
from panoptic_jax.model.kmax_deeplab import KMaXConfig
from panoptic_jax.training import checkpoint
from panoptic_jax.weights import backbones, kmax_port
from panoptic_jax.weights import mapping as M

# Our variables whose last axis indexes the K + 1 classes.
CLASS_VARIABLES = r".*(class_head|semantic_head\.classifier)\.(kernel|bias)"
# Our own names, as `export` and a workdir's checkpoints store them.
_OURS_ROOTS = ("params.", "model_state.")


class WeightsImportError(UserError, ValueError):
  """A weights file that does not fit the model; the message names the tensor, our variable and both shapes."""


@dataclasses.dataclass(frozen=True)
class Target:
  """One of our variables: its shape and whether it is a trained parameter (else a BatchNorm statistic)."""
  shape: tuple[int, ...]
  is_param: bool


def variables(state: dict[str, Any]) -> dict[str, Target]:
  """`{"params": ..., "model_state": ...}` (arrays or shape structs) -> our variable names and targets. RNG keys and
  counters are not weights and are left out."""
  out = {}
  for root in ("params", "model_state"):
    for path, leaf in jax.tree_util.tree_flatten_with_path(state[root])[0]:
      if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) or leaf.dtype == jnp.uint32:
        continue
      out[checkpoint.leaf_name(path)] = Target(tuple(leaf.shape), root == "params")
  return out


def _own_scheme(names: Sequence[str]) -> M.Scheme:
  return M.Scheme("panoptic_jax", "this project's variable names (a workdir's checkpoint or an export's weights)",
                  lambda arch, _: [M.Entry(_strip_root(n), (n,), classes=bool(re.fullmatch(CLASS_VARIABLES,
                                                                                        _strip_root(n))))
                                   for n in names],
                  marker=r"(params\.)?backbone\.stages\.0\..*")


def _strip_root(name: str) -> str:
  return next((name[len(r):] for r in _OURS_ROOTS if name.startswith(r)), name)


SCHEMES: tuple[M.Scheme, ...] = (*kmax_port.SCHEMES, *backbones.SCHEMES)


def detect(names: Sequence[str], where: str) -> M.Scheme:
  """The scheme whose marker a file's tensor names match (the whole-model schemes first)."""
  for scheme in SCHEMES:
    if scheme.recognises(names):
      return scheme
  own = _own_scheme(names)
  if own.recognises(names):
    return own
  known = ", ".join(s.name for s in SCHEMES)
  raise WeightsImportError(f"{where}: its {len(names)} tensors ({', '.join(sorted(names)[:4])}, ...) follow none of "
                           f"the known namings ({known}, this project's own)")


@dataclasses.dataclass(frozen=True)
class Value:
  """A variable's new value; `rows` (class variables): for each of our K + 1 classes the file's row, -1 = keep the
  initialisation."""
  array: np.ndarray
  rows: np.ndarray | None = None


@dataclasses.dataclass
class ImportReport:
  """What an import did: read by people at start and kept as JSON in the workdir."""
  source: str
  scheme: str
  description: str
  loaded: dict[str, list[str]]          # our variable -> the file's tensors it was computed from
  unused_expected: list[str]            # the file's tensors unused by design
  excluded_variables: list[str]         # our variables the exclude pattern kept from loading
  excluded_tensors: list[str]           # the file's tensors left out by it
  left_at_init: list[str]               # our variables not filled
  parameters_total: int
  parameters_loaded: int
  tensors_in_file: int
  classes: dict[str, Any] | None = None

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self) -> str:
    used = len({s for sources in self.loaded.values() for s in sources})
    lines = [f"Weights from {self.source} ({self.scheme}: {self.description}):",
             f"  {used} of {self.tensors_in_file} tensors used; {len(self.unused_expected)} unused by design"
             + (f" ({_examples(self.unused_expected)})" if self.unused_expected else ""),
             f"  {self.parameters_loaded:,} of {self.parameters_total:,} parameters loaded "
             f"({100 * self.parameters_loaded / max(self.parameters_total, 1):.1f}%); {len(self.left_at_init)} "
             "variables left at initialisation" + (f": {_prefixes(self.left_at_init)}" if self.left_at_init else "")]
    if self.excluded_variables or self.excluded_tensors:
      lines.append(f"  excluded: {len(self.excluded_variables)} variables ({_prefixes(self.excluded_variables)}), "
                   f"{len(self.excluded_tensors)} tensors of the file")
    if self.classes:
      c = self.classes
      lines.append(f"  classes: {c['kept']} of {c['model']} kept from the file's {c['file']}"
                   + (", reordered" if c["reordered"] else "")
                   + (f"; new (initialised): {_examples(c['new'])}" if c["new"] else "")
                   + (f"; the file's classes not in the model: {_examples(c['dropped'])}" if c["dropped"] else "")
                   + (f"; {c['note']}" if c.get("note") else ""))
    return "\n".join(lines)


def _examples(names: Sequence[str], n: int = 4) -> str:
  return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _prefixes(names: Sequence[str]) -> str:
  """Variables grouped by their first two name components (`pixel_decoder.stages: 310`)."""
  groups: dict[str, int] = {}
  for n in names:
    key = ".".join(n.split(".")[:2])
    groups[key] = groups.get(key, 0) + 1
  return ", ".join(f"{k} ({v})" for k, v in groups.items())


def class_rows(file_names: Sequence[str] | None, file_classes: int, model_names: Sequence[str] | None,
               model_classes: int, file_void: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
  """For each of the model's K + 1 classes (void last) the file's row or -1 (keep the initialisation), and the
  report's `classes` part.

  Counts and names exclude void; `file_void`: the file's rows end with void (which then maps to ours). When either
  side does not name its classes, rows are taken in order if the counts agree, and none are taken if they differ.
  """
  void = [file_classes] if file_void else [-1]
  if file_names is None or model_names is None:
    same = file_classes == model_classes
    rows = np.array((list(range(model_classes)) if same else [-1] * model_classes) + void)
    side = "the file" if file_names is None else "the model"
    note = (f"{side} does not name its classes: kept in order (same count)" if same else
            f"{side} does not name its classes and the counts differ ({file_classes} in the file): initialised")
    new = [] if same else [f"class {i}" for i in range(model_classes)]
    return rows, {"file": file_classes, "model": model_classes, "kept": model_classes if same else 0,
                  "reordered": False, "new": new, "dropped": [], "note": note}
  index = {name: i for i, name in enumerate(file_names)}
  rows = np.array([index.get(name, -1) for name in model_names] + void)
  kept = [i for i in rows[:-1] if i >= 0]
  model_set = set(model_names)
  return rows, {"file": len(file_names), "model": len(model_names), "kept": len(kept),
                "reordered": kept != list(range(len(kept))),
                "new": [name for name in model_names if name not in index],
                "dropped": [name for name in file_names if name not in model_set]}


def plan(tensors: dict[str, np.ndarray], targets: dict[str, Target], arch: KMaXConfig, num_classes: int, *,
         source: str, class_names: Sequence[str] | None = None, file_class_names: Sequence[str] | None = None,
         scheme: M.Scheme | None = None, exclude: str = "") -> tuple[dict[str, Value], ImportReport]:
  """Which of our variables each tensor fills, converted; raises WeightsImportError on anything that does not fit.

  Args:
    tensors: the file's tensors by name.
    targets: our variables (`variables(state)`).
    arch, num_classes: the model.
    source: the file's location, for messages.
    class_names: the model's K category names (void excluded): class rows are matched by name. None: in order.
    file_class_names: the file's category names when its format does not carry them (a workdir's config.json).
    scheme: the file's naming (None: detected).
    exclude: a regex; our variables and the file's tensors it matches (`re.search`) are neither loaded nor errors.
  """
  names = list(tensors)
  scheme = scheme or detect(names, source)
  try:
    entries = scheme.entries(arch, num_classes)
  except ValueError as e:
    raise WeightsImportError(f"{source}: a {scheme.name} file ({scheme.description}) does not fit this model: "
                             f"{e}") from None
  excluded = re.compile(exclude) if exclude else None
  values: dict[str, Value] = {}
  loaded: dict[str, list[str]] = {}
  skipped: list[str] = []
  skipped_sources: set[str] = set()
  classes = None
  for entry in entries:
    target = targets.get(entry.target)
    if excluded and (excluded.search(entry.target) or any(excluded.search(s) for s in entry.sources)):
      if target is not None:
        skipped.append(entry.target)
      skipped_sources.update(entry.sources)
      continue
    if target is None:
      shape = tuple(tensors[entry.sources[0]].shape) if entry.sources[0] in tensors else "?"
      raise WeightsImportError(f"{source}: its tensor {entry.sources[0]} {shape} maps to {entry.target}, which this model "
                               f"({_arch_name(arch)}) does not have: is the file of another model?")
    missing = [s for s in entry.sources if s not in tensors]
    if missing:
      raise WeightsImportError(f"{source}: no tensor {missing[0]}, which {entry.target} {target.shape} is made from "
                               f"(a {scheme.name} file for {_arch_name(arch)} has it): is the file of another "
                               "model?")
    arrays = [np.asarray(tensors[s]) for s in entry.sources]
    array = entry.convert(arrays[0], target.shape) if entry.kernel else entry.convert(*arrays)
    rows = None
    expected = target.shape
    if entry.classes:
      rows_in_file = array.shape[-1]
      file_k = rows_in_file - 1 if entry.void else rows_in_file
      rows, part = class_rows(file_class_names or scheme.class_names(file_k), file_k, class_names, num_classes,
                              file_void=entry.void)
      classes = classes or part
      expected = target.shape[:-1] + (rows_in_file,)
    if tuple(array.shape) != tuple(expected):
      shapes = ", ".join(f"{s} {tuple(tensors[s].shape)}" for s in entry.sources)
      raise WeightsImportError(f"{source}: tensor {shapes} does not fit {entry.target} {target.shape} (converted: "
                               f"{tuple(array.shape)}); the file is of another model than {_arch_name(arch)}")
    values[entry.target] = Value(array.astype(np.float32), rows)
    loaded[entry.target] = list(entry.sources)
  used = {s for sources in loaded.values() for s in sources}
  unused = [n for n in names if n not in used]
  excluded_names = [n for n in unused if n in skipped_sources or (excluded and excluded.search(n))]
  by_design = [n for n in unused if n not in excluded_names and scheme.expected_unused(n)]
  unexpected = [n for n in unused if n not in excluded_names and n not in by_design]
  if unexpected:
    shapes = ", ".join(f"{n} {tuple(tensors[n].shape)}" for n in unexpected[:5])
    raise WeightsImportError(
        f"{source}: {len(unexpected)} tensors of the {scheme.name} file have no place in {_arch_name(arch)}: "
        f"{shapes}{', ...' if len(unexpected) > 5 else ''}; the file is of another model, or pass "
        "config.model.init_from_exclude (a regex) to leave them out")
  report = ImportReport(
      source=source, scheme=scheme.name, description=scheme.description, loaded=loaded, unused_expected=by_design,
      excluded_variables=skipped, excluded_tensors=excluded_names, left_at_init=[t for t in targets if t not in values],
      parameters_total=sum(int(np.prod(t.shape)) for t in targets.values() if t.is_param),
      parameters_loaded=sum(_loaded_size(values[n], targets[n]) for n in values if targets[n].is_param),
      tensors_in_file=len(names), classes=classes)
  return values, report


def _loaded_size(value: Value, target: Target) -> int:
  size = int(np.prod(target.shape))
  if value.rows is None:
    return size
  return size // target.shape[-1] * int(np.sum(value.rows >= 0))


def _arch_name(arch: KMaXConfig) -> str:
  widths = "x".join(map(str, arch.backbone_widths))
  return f"a {arch.backbone} {'-'.join(map(str, arch.backbone_blocks))} / {widths} kMaX model"


def _placed(value: Value, leaf: jax.Array) -> jax.Array:
  """`value` on `leaf`'s devices and sharding (every process passes the whole array and places its part)."""
  array = value.array
  if value.rows is not None:
    array = np.take(array, np.maximum(value.rows, 0), axis=-1)
  array = array.astype(leaf.dtype)
  placed = jax.make_array_from_callback(array.shape, leaf.sharding, lambda index: array[index])
  if value.rows is None or (value.rows >= 0).all():
    return placed
  keep = jnp.asarray(value.rows >= 0)
  return jax.jit(lambda new, old: jnp.where(keep, new, old), out_shardings=leaf.sharding)(placed, leaf)


def assign(state: dict[str, Any], values: dict[str, Value]) -> dict[str, Any]:
  """`state` (`{"params", "model_state", ...}` of arrays) with the planned variables replaced, in their shardings."""
  out = dict(state)
  for root in ("params", "model_state"):
    out[root] = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (_placed(values[checkpoint.leaf_name(path)], leaf)
                            if checkpoint.leaf_name(path) in values else leaf), state[root])
  return out


def model_variables(model: nnx.Module) -> dict[str, Any]:
  """A model's weights as the `{"params", "model_state"}` tree that `variables` and `assign` take."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return {"params": params, "model_state": rest}
