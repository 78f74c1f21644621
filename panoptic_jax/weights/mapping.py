"""How another framework's tensors become this model's variables: entries, layout conversions, naming schemes.

An `Entry` says how one of our variables (`backbone.stem.conv.kernel`, named like `checkpoint.leaf_name` without
the `params.` / `model_state.` root) is computed from one or more tensors of a file (`conv1.weight`). A `Scheme` is
a file family's naming (torchvision ResNet, detectron2 ResNet, official / timm ConvNeXt, the authors' PyTorch port
of kMaX-DeepLab, this project's own variables): it lists the entries for a model architecture, the file's tensors
that the model leaves unused by design (classifiers, BatchNorm step counters), and a marker that recognises it.

The layout conversions live here, once:
- PyTorch convolutions are `[O, I/groups, kh, kw]`; ours `[kh, kw, I/groups, O]` (Flax HWIO). A 1x1 convolution, a
  `Conv1d` `[O, I, 1]` and a `Linear` `[O, I]` all become our dense kernel `[I, O]`.
- BatchNorm `weight, bias, running_mean, running_var` -> `scale, bias, mean, var`. Our BatchNorms divide by
  `sqrt(var + 1e-3)` (kMaX's epsilon); a file trained with another epsilon (torchvision's 1e-5) gets its scale
  multiplied by `sqrt(var + 1e-3) / sqrt(var + eps)`, so that in eval mode the layer computes exactly what it
  computed at home. LayerNorm `weight, bias` -> `scale, bias` (ConvNeXt's epsilon 1e-6 is ours too).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from panoptic_jax.model import layers
from panoptic_jax.model.kmax_deeplab import KMaXConfig

Convert = Callable[..., np.ndarray]


def same(x: np.ndarray) -> np.ndarray:
  return x


def torch_kernel(w: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """A PyTorch `Conv2d` / `Conv1d` / `Linear` weight -> our kernel of `shape`: HWIO for a k x k (or depthwise)
  convolution, `[I, O]` for a dense one (`[O, I]`, `[O, I, 1]` and `[O, I, 1, 1]` alike)."""
  if len(shape) == 2 and w.ndim >= 2 and all(d == 1 for d in w.shape[2:]):
    return w.reshape(w.shape[0], w.shape[1]).T
  if len(shape) == 4 and w.ndim == 4:
    return w.transpose(2, 3, 1, 0)
  return w   # Left as it is: the shape check names both sides.


def folded_scale(eps: float) -> Convert:
  """BatchNorm `(weight, running_var)` of a file whose epsilon is `eps` -> our scale (see module doc)."""
  return lambda w, var: (w * np.sqrt(var.astype(np.float64) + layers.BN_EPSILON)
                         / np.sqrt(var.astype(np.float64) + eps)).astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class Entry:
  """Our variable `target` = `convert(*file tensors named sources)`; `kernel` entries convert with the target's
  shape (`torch_kernel`). `classes`: the last axis holds the classes, kept by category name when the file's label
  space differs from the model's; `void`: the file's class axis ends with void (ours always does)."""
  target: str
  sources: tuple[str, ...]
  convert: Convert = same
  kernel: bool = False
  classes: bool = False
  void: bool = True


def kernel(target: str, source: str, *, classes: bool = False) -> Entry:
  return Entry(target, (source,), torch_kernel, kernel=True, classes=classes)


def tensor(target: str, source: str, *, classes: bool = False) -> Entry:
  return Entry(target, (source,), classes=classes)


def batch_norm(ours: str, theirs: str, eps: float) -> list[Entry]:
  """`ours.{scale, bias, mean, var}` from `theirs.{weight, bias, running_mean, running_var}` (the scale also from
  the variance when the epsilons differ)."""
  scale = (Entry(f"{ours}.scale", (f"{theirs}.weight",)) if eps == layers.BN_EPSILON else
           Entry(f"{ours}.scale", (f"{theirs}.weight", f"{theirs}.running_var"), folded_scale(eps)))
  return [scale,
          tensor(f"{ours}.bias", f"{theirs}.bias"),
          tensor(f"{ours}.mean", f"{theirs}.running_mean"),
          tensor(f"{ours}.var", f"{theirs}.running_var")]


def layer_norm(ours: str, theirs: str) -> list[Entry]:
  return [tensor(f"{ours}.scale", f"{theirs}.weight"), tensor(f"{ours}.bias", f"{theirs}.bias")]


def linear(ours: str, theirs: str, *, bias: bool = True, classes: bool = False) -> list[Entry]:
  """A `Linear` / 1x1 convolution (+ bias) -> our dense or conv `kernel` (+ `bias`)."""
  out = [kernel(f"{ours}.kernel", f"{theirs}.weight", classes=classes)]
  if bias:
    out.append(tensor(f"{ours}.bias", f"{theirs}.bias", classes=classes))
  return out


def conv_bn(ours: str, conv: str, norm: str, eps: float) -> list[Entry]:
  """Our `ConvBN` at `ours` (`.conv.kernel`, `.norm.*`) from a bias-free convolution and its BatchNorm."""
  return [kernel(f"{ours}.conv.kernel", f"{conv}.weight"), *batch_norm(f"{ours}.norm", norm, eps)]


@dataclasses.dataclass(frozen=True)
class Scheme:
  """A file family's naming.

  Attributes:
    name: short name (`torchvision_resnet`), shown in reports and accepted by `--scheme`.
    description: one line for reports.
    entries: `(architecture, num_classes) -> entries` for a model of that architecture (raises ValueError when the
      scheme cannot describe it, e.g. a ConvNeXt file for a ResNet preset).
    marker: a regex that some tensor name of every file of the family matches (and no other family's).
    unused: regexes of the file's tensors that the model leaves unused by design (a classifier, step counters).
    class_names: the file's number of classes (void excluded) -> their names, when the family's label spaces
      are known.
  """
  name: str
  description: str
  entries: Callable[[KMaXConfig, int], list[Entry]]
  marker: str
  unused: tuple[str, ...] = ()
  class_names: Callable[[int], tuple[str, ...] | None] = lambda _: None

  def recognises(self, names: Sequence[str]) -> bool:
    pattern = re.compile(self.marker)
    return any(pattern.fullmatch(n) for n in names)

  def expected_unused(self, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in self.unused)


BN_COUNTERS = r".*num_batches_tracked"
