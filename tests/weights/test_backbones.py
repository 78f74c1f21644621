"""ImageNet backbones imported from PyTorch files compute what they computed at home (`panoptic_jax.weights`).

Each case builds the PyTorch network with timm (random weights, every BatchNorm's statistics and affine randomised
so that the epsilon folding and the statistics are exercised; ConvNeXt's layer scales and norms too, else its
blocks would add ~1e-6 of their output), saves it in the file type under test, imports the file into our model with
`importer.plan` / `importer.assign`, runs both on the same input (batch 2, 65 x 65, uniform in [-1, 1]) and compares
the features at strides 4, 8, 16, 32 (and ResNet's 2): `max |ours - theirs| <= 1e-4 * max(1, max |theirs|)` per
stride, i.e. relative to the feature scale (the random networks' features reach 1e2 in R50, 5e4 in R101, 10 in
ConvNeXt); `-s` prints the differences seen. The PyTorch reference is driven module by module, so that ConvNeXt gets
the kMaX port's padding (1 / 2 before the stem, 0 / 1 before each downsampler) as ours does.

The report is checked too: every tensor of the file used or unused by design (classifier, ConvNeXt's final norm,
`num_batches_tracked`), every backbone variable loaded, everything outside `backbone.` left at initialisation.

Needs torch and timm (requirements-torch.txt); skipped without them. timm imports torchvision, which has no build
for this torch here: the `timm` fixture puts an import-only stand-in on `sys.path` (tests/weights/torchvision_stub).
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import pickle
import re
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from panoptic_jax.model import kmax_deeplab
from panoptic_jax.training import checkpoint
from panoptic_jax.weights import importer, readers

STUB = pathlib.Path(__file__).resolve().parent / "torchvision_stub"
NUM_CLASSES = 133
SIZE = 65          # 32k + 1: features 17, 9, 5, 3 at strides 4..32.
RTOL = 1e-4
MAX_DIFF: dict[str, dict[int, tuple[float, float]]] = {}   # case -> stride -> (max |ours - theirs|, max |theirs|)


# ----------------------------------------------------------------------------------------------------------------------
# PyTorch side


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def timm(torch):
  """timm, imported with the torchvision stand-in on `sys.path` when no torchvision is importable (only for this
  import: the stand-in's modules stay in `sys.modules` for timm, the path entry is removed). Skips when timm is not
  installed; an installed timm that fails to import (say, a version that imports more of torchvision) fails."""
  del torch
  if importlib.util.find_spec("timm") is None:
    pytest.skip("timm is not installed (requirements-torch.txt)")
  if "timm" in sys.modules or importlib.util.find_spec("torchvision") is not None:
    return importlib.import_module("timm")
  sys.path.insert(0, str(STUB))
  try:
    return importlib.import_module("timm")
  finally:
    sys.path.remove(str(STUB))


def randomise(torch, net):
  """Random BatchNorm statistics and affine (mean N(0, 0.1), var U(0.5, 2), weight U(0.5, 1.5), bias N(0, 0.1));
  ConvNeXt's LayerNorms likewise, its layer scales U(0.5, 1.5) and its biases N(0, 0.1); eval mode."""
  g = torch.Generator().manual_seed(0)

  def normal(t, std):
    t.copy_(torch.randn(t.shape, generator=g) * std)

  def uniform(t, lo, hi):
    t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        normal(module.running_mean, 0.1)
        uniform(module.running_var, 0.5, 2.0)
        uniform(module.weight, 0.5, 1.5)
        normal(module.bias, 0.1)
      elif isinstance(module, torch.nn.LayerNorm):   # timm's LayerNorm2d too
        uniform(module.weight, 0.5, 1.5)
        normal(module.bias, 0.1)
      elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
        normal(module.bias, 0.1)
    for name, p in net.named_parameters():
      if name.endswith("gamma"):
        uniform(p, 0.5, 1.5)
  return net.eval()


def torch_features(torch, net, x: np.ndarray, convnext: bool) -> dict[int, np.ndarray]:
  """timm's network on `x` `[B, H, W, 3]`, module by module -> `{stride: [B, h, w, C]}` (ResNet: 2, 4, 8, 16, 32;
  ConvNeXt: 4, 8, 16, 32, after the kMaX port's padding)."""
  F = torch.nn.functional
  feats = {}
  with torch.no_grad():
    h = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if convnext:
      h = net.stem(F.pad(h, (1, 2, 1, 2)))
      for s, stage in enumerate(net.stages):
        if s > 0:
          norm, conv = stage.downsample
          h = conv(F.pad(norm(h), (0, 1, 0, 1)))
        h = stage.blocks(h)
        feats[4 * 2 ** s] = h
    else:
      h = feats[2] = net.act1(net.bn1(net.conv1(h)))
      h = net.maxpool(h)
      for s in range(4):
        h = getattr(net, f"layer{s + 1}")(h)
        feats[4 * 2 ** s] = h
  return {k: v.permute(0, 2, 3, 1).numpy() for k, v in feats.items()}


def state_dict(net) -> dict:
  return {k: v.detach().clone() for k, v in net.state_dict().items()}


def save(torch, sd: dict, path: pathlib.Path) -> pathlib.Path:
  """`sd` (torch tensors) in the file type of `path`'s suffix; `.pth` files may wrap it (`{"model": sd}`)."""
  if path.suffix == ".safetensors":
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
  else:
    torch.save(sd, path)
  return path


def detectron2_names(sd: dict) -> dict[str, np.ndarray]:
  """A torchvision ResNet state dict renamed as detectron2's `tools/convert-torchvision-to-d2.py` does, numpy values.
  Like the script, this keeps the classifier, as `stem.fc.*` (every name without `layer` gets `stem.`)."""
  out = {}
  for k, v in sd.items():
    if "layer" not in k:
      k = "stem." + k
    for t in range(1, 5):
      k = k.replace(f"layer{t}", f"res{t + 1}")
    for t in range(1, 4):
      k = k.replace(f"bn{t}", f"conv{t}.norm")
    out[k.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")] = v.numpy()
  return out


def official_convnext_names(sd: dict) -> dict:
  """A timm ConvNeXt state dict in the official release's names (`facebookresearch/ConvNeXt`)."""
  out = {}
  for k, v in sd.items():
    k = re.sub(r"^stem\.", "downsample_layers.0.", k)
    k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
    k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
    k = re.sub(r"^head\.norm\.", "norm.", k)
    k = re.sub(r"^head\.fc\.", "head.", k)
    out[k] = v
  return out


# ----------------------------------------------------------------------------------------------------------------------
# Our side


class Ours:
  """Our model of a preset (eval mode), its initial variables, and `load(file)` -> the import report.

  Built as `abstract_model` with its variables filled from numpy (backbone zeros, the rest N(0, 0.02)), not by
  `build_model`: its initialisers compile one XLA program per parameter shape (~30 s for R50 on 2 cores), and the
  import does not care what the initial values are, only that it replaces the backbone's and keeps the rest."""

  def __init__(self, preset: str):
    self.preset = preset
    graphdef, state = nnx.split(kmax_deeplab.abstract_model(preset, NUM_CLASSES))
    rng = np.random.default_rng(0)
    self.model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(lambda path, leaf: _fill(path, leaf, rng),
                                                                      state))
    self.model.eval()
    self.initial = importer.model_variables(self.model)
    self.targets = importer.variables(self.initial)
    flat = _flat(self.initial)
    self.initial_values = {k: np.asarray(flat[k]) for k in self.targets if not k.startswith("backbone.")}
    self.backbone = nnx.jit(lambda backbone, x: backbone(x))

  def load(self, path: pathlib.Path, **kwargs) -> importer.ImportReport:
    nnx.update(self.model, self.initial["params"], self.initial["model_state"])   # back to initialisation
    state = importer.model_variables(self.model)
    values, report = importer.plan(readers.read_tensors(path), importer.variables(state), self.model.cfg,
                                   NUM_CLASSES, source=str(path), **kwargs)
    state = importer.assign(state, values)
    nnx.update(self.model, state["params"], state["model_state"])
    return report

  def features(self, x: np.ndarray) -> dict[int, np.ndarray]:
    return {k: np.asarray(v) for k, v in self.backbone(self.model.backbone, x).items()}


def _fill(path, leaf: jax.ShapeDtypeStruct, rng: np.random.Generator) -> jax.Array:
  """An abstract variable made concrete without compiling anything (see `Ours`)."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    return jax.random.key(0) if not leaf.shape else jax.random.split(jax.random.key(0), leaf.shape)
  if not np.issubdtype(leaf.dtype, np.floating) or jax.tree_util.keystr(path[:1], simple=True) == "backbone":
    return jax.device_put(np.zeros(leaf.shape, leaf.dtype))
  return jax.device_put((rng.standard_normal(leaf.shape, np.float32) * 0.02).astype(leaf.dtype))


def _flat(state: dict) -> dict[str, jax.Array]:
  """`{"params", "model_state"}` -> `{our variable name: array}` (RNG keys and counters included)."""
  return {checkpoint.leaf_name(path): leaf for root in ("params", "model_state")
          for path, leaf in jax.tree_util.tree_flatten_with_path(state[root])[0]}


_MODELS: dict[str, Ours] = {}


def ours(preset: str) -> Ours:
  """The model of a preset, kept while consecutive tests ask for it (building one costs seconds; `load` resets
  it); one at a time, so that ConvNeXt-L and the others are not all held at once."""
  if preset not in _MODELS:
    _MODELS.clear()
    _MODELS[preset] = Ours(preset)
  return _MODELS[preset]


@pytest.fixture(scope="module", autouse=True)
def _release_models():
  yield
  _MODELS.clear()
  if MAX_DIFF:
    print("\nper stride: max |ours - theirs| (max |theirs|; the ratio to max(1, max |theirs|))")
    for case, diffs in MAX_DIFF.items():
      print(f"  {case}: " + ", ".join(f"{s}: {d:.1e} ({scale:.3g}; {d / max(1, scale):.1e})"
                                      for s, (d, scale) in diffs.items()))


# ----------------------------------------------------------------------------------------------------------------------
# Checks


def check_report(report: importer.ImportReport, model: Ours, file_names, classifier: set[str]) -> None:
  """The file's tensors used but for exactly the classifier (`classifier`) and the BatchNorm step counters; every
  backbone variable loaded; everything else left at initialisation, untouched."""
  used = {s for sources in report.loaded.values() for s in sources}
  counters = {n for n in file_names if n.endswith("num_batches_tracked")}
  assert set(report.unused_expected) == classifier | counters
  assert used == set(file_names) - classifier - counters
  assert not report.excluded_variables and not report.excluded_tensors
  backbone = {t for t in model.targets if t.startswith("backbone.")}
  assert set(report.loaded) == backbone
  assert set(report.left_at_init) == set(model.targets) - backbone
  assert report.parameters_loaded == sum(int(np.prod(model.targets[t].shape)) for t in backbone
                                         if model.targets[t].is_param)
  now = _flat(importer.model_variables(model.model))
  for name in report.left_at_init:
    np.testing.assert_array_equal(np.asarray(now[name]), model.initial_values[name], err_msg=name)


def check_features(case: str, theirs: dict[int, np.ndarray], mine: dict[int, np.ndarray]) -> None:
  diffs = {}
  assert set(mine) == set(theirs), (set(mine), set(theirs))
  for s in sorted(theirs):
    assert mine[s].shape == theirs[s].shape, (s, mine[s].shape, theirs[s].shape)
    diffs[s] = float(np.abs(mine[s] - theirs[s]).max()), float(np.abs(theirs[s]).max())
  MAX_DIFF[case] = diffs
  assert all(d <= RTOL * max(1.0, scale) for d, scale in diffs.values()), (case, diffs)


def _input(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------------
# ResNet

RESNET_CLASSIFIER = {"fc.weight", "fc.bias"}


@pytest.fixture(scope="module")
def resnet50(torch, timm):
  net = randomise(torch, timm.create_model("resnet50", pretrained=False))
  return net, state_dict(net), torch_features(torch, net, _input(), convnext=False)


@pytest.fixture(scope="module")
def resnet101(torch, timm):
  net = randomise(torch, timm.create_model("resnet101", pretrained=False))
  return net, state_dict(net)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet50_torchvision_names(torch, resnet50, tmp_path, suffix):
  _, sd, theirs = resnet50
  path = save(torch, sd, tmp_path / f"resnet50{suffix}")
  model = ours("kmax_r50_coco")
  report = model.load(path)
  assert report.scheme == "torchvision_resnet"
  check_report(report, model, sd, RESNET_CLASSIFIER)
  check_features(f"resnet50{suffix}", theirs, model.features(_input()))


def test_resnet50_detectron2_pkl(resnet50, tmp_path):
  _, sd, theirs = resnet50
  path = tmp_path / "R-50.pkl"
  with open(path, "wb") as f:
    pickle.dump({"model": detectron2_names(sd), "__author__": "torchvision", "matching_heuristics": True}, f)
  model = ours("kmax_r50_coco")
  report = model.load(path)
  assert report.scheme == "detectron2_resnet"
  check_report(report, model, detectron2_names(sd), {"stem.fc.weight", "stem.fc.bias"})
  check_features("resnet50 detectron2 .pkl", theirs, model.features(_input()))


def test_resnet101_into_r50_names_the_unused_tensors(torch, resnet101, tmp_path):
  path = save(torch, resnet101[1], tmp_path / "resnet101.pth")
  with pytest.raises(importer.WeightsImportError, match=r"have no place in .* layer3\.6\.conv1\.weight \(256, 1024, 1"):
    ours("kmax_r50_coco").load(path)


def test_unexpected_tensor_raises_unless_excluded(torch, resnet50, tmp_path):
  _, sd, theirs = resnet50
  path = save(torch, {**sd, "extra.weight": torch.ones(3)}, tmp_path / "resnet50_extra.pth")
  model = ours("kmax_r50_coco")
  with pytest.raises(importer.WeightsImportError, match=r"1 tensors .* no place .* extra\.weight \(3,\)"):
    model.load(path)
  report = model.load(path, exclude=r"^extra\.")
  assert report.excluded_tensors == ["extra.weight"] and not report.excluded_variables
  assert set(report.loaded) == {t for t in model.targets if t.startswith("backbone.")}
  check_features("resnet50 + excluded tensor", theirs, model.features(_input()))


def test_resnet101_pth(torch, resnet101, tmp_path):
  net, sd = resnet101
  path = save(torch, sd, tmp_path / "resnet101.pth")
  model = ours("kmax_r101_coco")
  report = model.load(path)
  check_report(report, model, sd, RESNET_CLASSIFIER)
  check_features("resnet101.pth", torch_features(torch, net, _input(1), convnext=False), model.features(_input(1)))


# ----------------------------------------------------------------------------------------------------------------------
# ConvNeXt

# The classifier and the final norm (pre-pooling in timm's head).
CONVNEXT_UNUSED = {"timm_convnext": {"head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"},
                   "convnext": {"norm.weight", "norm.bias", "head.weight", "head.bias"}}
CONVNEXT_SIZES = {"t": "tiny", "s": "small", "b": "base", "l": "large"}
# T and B in both namings; S and L (the slow ones) in one each.
CONVNEXT_CASES = [("t", "timm"), ("t", "official"), ("b", "timm"), ("b", "official"), ("s", "official"),
                  ("l", "timm")]


@pytest.fixture(scope="module")
def convnexts(torch, timm):
  """`size -> (timm network, state dict, its features)`, each built once."""
  cache = {}

  def get(size: str):
    if size not in cache:
      cache.clear()   # One at a time (the tests ask for them in order).
      net = randomise(torch, timm.create_model(f"convnext_{CONVNEXT_SIZES[size]}", pretrained=False))
      cache[size] = net, state_dict(net), torch_features(torch, net, _input(), convnext=True)
    return cache[size]

  yield get
  cache.clear()


def test_official_names_are_timms_inverse(torch, timm, convnexts):
  """Our renaming to official names, undone by timm's own converter, loads strictly and gives the same tensors."""
  net, sd, _ = convnexts("t")
  official = official_convnext_names(sd)
  assert any(k.startswith("downsample_layers.3.") for k in official) and "norm.weight" in official
  converted = timm.models.convnext.checkpoint_filter_fn({"model": official}, net)
  assert set(converted) == set(sd)
  for k, v in converted.items():
    torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
  net.load_state_dict(converted, strict=True)


def test_convnext_t_into_b_names_the_first_mismatch(torch, convnexts, tmp_path):
  path = save(torch, convnexts("t")[1], tmp_path / "convnext_t.pth")
  abstract = kmax_deeplab.abstract_model("kmax_convnext_b_coco", NUM_CLASSES)
  targets = importer.variables(importer.model_variables(abstract))
  first = r"tensor stem\.0\.weight \(96, 3, 4, 4\) does not fit backbone\.stages\.0\.down_conv\.kernel \(4, 4, 3, 128\)"
  with pytest.raises(importer.WeightsImportError, match=first):
    importer.plan(readers.read_tensors(path), targets, abstract.cfg, NUM_CLASSES, source=str(path))


@pytest.mark.parametrize("size,naming", CONVNEXT_CASES)
def test_convnext(torch, convnexts, tmp_path, size, naming):
  _, sd, theirs = convnexts(size)
  if naming == "timm":
    path = save(torch, sd, tmp_path / f"convnext_{size}.safetensors")
    file_names, scheme = list(sd), "timm_convnext"
  else:
    official = official_convnext_names(sd)
    path = save(torch, {"model": official}, tmp_path / f"convnext_{size}_1k_224.pth")
    file_names, scheme = list(official), "convnext"
  model = ours(f"kmax_convnext_{size}_coco")
  report = model.load(path)
  assert report.scheme == scheme
  check_report(report, model, file_names, CONVNEXT_UNUSED[scheme])
  check_features(f"convnext_{size} {naming}", theirs, model.features(_input()))
