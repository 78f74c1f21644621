"""ImageNet backbones from PyTorch files: ResNet (torchvision / timm, detectron2) and ConvNeXt (official, timm).

Names on each side (`s` stage, `b` block; ours under `backbone.`):

| ours | torchvision / timm ResNet | detectron2 ResNet (the port's `R-50.pkl`) |
|---|---|---|
| `stem.{conv, norm}` | `conv1`, `bn1` | `stem.conv1`, `stem.conv1.norm` |
| `stages.s.blocks.b.convK.{conv, norm}` | `layer{s+1}.b.convK`, `.bnK` | `res{s+2}.b.convK`, `.convK.norm` |
| `stages.s.blocks.0.shortcut.{conv, norm}` | `.downsample.0`, `.downsample.1` | `.shortcut`, `.shortcut.norm` |

Both are ResNet v1.5 (stride on the 3x3 convolution: detectron2's `STRIDE_IN_1X1: False`, as the port builds it).
torchvision's and timm's BatchNorms use epsilon 1e-5 (folded into the scale, see `mapping`); detectron2 files
converted from torchvision carry the same statistics (the port then runs them with 1e-3 unfolded, its own choice).

| ours | official ConvNeXt (`facebookresearch/ConvNeXt`) | timm ConvNeXt |
|---|---|---|
| `stages.0.down_conv`, `.down_norm` | `downsample_layers.0.0`, `.0.1` | `stem.0`, `stem.1` |
| `stages.s.down_norm`, `.down_conv` (s > 0) | `downsample_layers.s.0`, `.s.1` | `stages.s.downsample.0`, `.1` |
| `stages.s.blocks.b.{dwconv, norm, pwconv1, pwconv2, gamma}` | `stages.s.b.{same}` | `stages.s.blocks.b.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}` |

The classifiers (`fc`, `head`) and ConvNeXt's final norm are unused by a dense-prediction backbone. detectron2's
`convert-torchvision-to-d2.py` prefixes every name without `layer` with `stem.`, so its files carry the classifier
as `stem.fc.weight` / `stem.fc.bias`.
"""

from __future__ import annotations

from panoptic_jax.model.kmax_deeplab import KMaXConfig
from panoptic_jax.weights import mapping as M

TORCH_BN_EPSILON = 1e-5


def _need(arch: KMaXConfig, backbone: str) -> None:
  if arch.backbone != backbone:
    raise ValueError(f"the file holds a {backbone} backbone; the model's backbone is a {arch.backbone}")


def resnet(arch: KMaXConfig, theirs: str, ours: str = "backbone", *, detectron2: bool, eps: float) -> list[M.Entry]:
  """ResNet entries; `theirs` is the file's prefix (`""`, `"backbone."`), `ours` our module path."""
  _need(arch, "resnet")
  d2 = detectron2
  convs = 3 if arch.resnet_bottleneck else 2
  if d2:
    entries = M.conv_bn(f"{ours}.stem", f"{theirs}stem.conv1", f"{theirs}stem.conv1.norm", eps)
  else:
    entries = M.conv_bn(f"{ours}.stem", f"{theirs}conv1", f"{theirs}bn1", eps)
  for s, blocks in enumerate(arch.backbone_blocks):
    for b in range(blocks):
      mine = f"{ours}.stages.{s}.blocks.{b}"
      block = f"{theirs}res{s + 2}.{b}" if d2 else f"{theirs}layer{s + 1}.{b}"
      for k in range(1, convs + 1):
        norm = f"{block}.conv{k}.norm" if d2 else f"{block}.bn{k}"
        entries += M.conv_bn(f"{mine}.conv{k}", f"{block}.conv{k}", norm, eps)
      if b == 0 and (s > 0 or arch.resnet_bottleneck):   # Where the width or the stride changes.
        if d2:
          entries += M.conv_bn(f"{mine}.shortcut", f"{block}.shortcut", f"{block}.shortcut.norm", eps)
        else:
          entries += M.conv_bn(f"{mine}.shortcut", f"{block}.downsample.0", f"{block}.downsample.1", eps)
  return entries


def convnext(arch: KMaXConfig, theirs: str, ours: str = "backbone", *, timm: bool) -> list[M.Entry]:
  """ConvNeXt entries; `theirs` is the file's prefix, `ours` our module path."""
  _need(arch, "convnext")
  entries = []
  for s, depth in enumerate(arch.backbone_blocks):
    stage = f"{ours}.stages.{s}"
    if timm:
      down = f"{theirs}stem" if s == 0 else f"{theirs}stages.{s}.downsample"
    else:
      down = f"{theirs}downsample_layers.{s}"
    conv, norm = (f"{down}.0", f"{down}.1") if s == 0 else (f"{down}.1", f"{down}.0")
    entries += [*M.linear(f"{stage}.down_conv", conv), *M.layer_norm(f"{stage}.down_norm", norm)]
    for b in range(depth):
      mine = f"{stage}.blocks.{b}"
      if timm:
        block = f"{theirs}stages.{s}.blocks.{b}"
        names = ("conv_dw", "norm", "mlp.fc1", "mlp.fc2")
      else:
        block = f"{theirs}stages.{s}.{b}"
        names = ("dwconv", "norm", "pwconv1", "pwconv2")
      entries += [*M.linear(f"{mine}.dwconv", f"{block}.{names[0]}"),
                  *M.layer_norm(f"{mine}.norm", f"{block}.{names[1]}"),
                  *M.linear(f"{mine}.pwconv1", f"{block}.{names[2]}"),
                  *M.linear(f"{mine}.pwconv2", f"{block}.{names[3]}"),
                  M.tensor(f"{mine}.gamma", f"{block}.gamma")]
  return entries


SCHEMES = (
    M.Scheme("torchvision_resnet", "ResNet, torchvision / timm names (conv1, bn1, layerN.B.convK, downsample)",
             lambda arch, _: resnet(arch, "", detectron2=False, eps=TORCH_BN_EPSILON),
             marker=r"layer1\.0\.conv1\.weight", unused=(r"fc\..*", M.BN_COUNTERS)),
    M.Scheme("detectron2_resnet", "ResNet, detectron2 names (stem.conv1, resN.B.convK.norm, shortcut)",
             lambda arch, _: resnet(arch, "", detectron2=True, eps=TORCH_BN_EPSILON),
             marker=r"res2\.0\.conv1\.weight", unused=(r"(stem\.)?fc\..*", r"linear\..*", M.BN_COUNTERS)),
    M.Scheme("convnext", "ConvNeXt, official names (downsample_layers, stages.S.B.dwconv / pwconv)",
             lambda arch, _: convnext(arch, "", timm=False),
             marker=r"downsample_layers\.0\.0\.weight", unused=(r"norm\..*", r"head\..*")),
    M.Scheme("timm_convnext", "ConvNeXt, timm names (stem, stages.S.downsample, blocks.B.conv_dw / mlp)",
             lambda arch, _: convnext(arch, "", timm=True),
             marker=r"stages\.0\.blocks\.0\.conv_dw\.weight", unused=(r"head\..*", r"norm_pre\..*")),
)
