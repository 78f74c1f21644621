"""ResNet (v1.5: stride on the 3x3 conv), torchvision-compatible parameter counts, channels-last.

`ResNet(blocks=(3, 4, 6, 3), widths=(64, 128, 256, 512), bottleneck=True)` is ResNet-50 (23,508,032 parameters
without the classifier, as torchvision); (2, 2, 2, 2) basic blocks is ResNet-18, (3, 4, 23, 3) ResNet-101.

Returns features keyed by stride: `{2: stem conv (before max-pool), 4, 8, 16, 32}`. For an input of size
`32 * k + 1` every feature has size `(H - 1) // stride + 1` (symmetric padding), the grid kMaX expects.
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from panoptic_jax.model import layers as L


class BasicBlock(nnx.Module):
  expansion = 1

  def __init__(self, in_ch: int, width: int, stride: int, *, dtype, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = L.ConvBN(in_ch, width, 3, stride=stride, act="relu", dtype=dtype, rngs=rngs)
    self.conv2 = L.ConvBN(width, out_ch, 3, act=None, dtype=dtype, rngs=rngs)
    self.shortcut = (L.ConvBN(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs)
                     if stride != 1 or in_ch != out_ch else None)

  def __call__(self, x):
    s = x if self.shortcut is None else self.shortcut(x)
    return jax.nn.relu(self.conv2(self.conv1(x)) + s)


class Bottleneck(nnx.Module):
  expansion = 4

  def __init__(self, in_ch: int, width: int, stride: int, *, dtype, rngs: nnx.Rngs):
    out_ch = width * self.expansion
    self.conv1 = L.ConvBN(in_ch, width, 1, act="relu", dtype=dtype, rngs=rngs)
    self.conv2 = L.ConvBN(width, width, 3, stride=stride, act="relu", dtype=dtype, rngs=rngs)
    self.conv3 = L.ConvBN(width, out_ch, 1, act=None, dtype=dtype, rngs=rngs)
    self.shortcut = (L.ConvBN(in_ch, out_ch, 1, stride=stride, dtype=dtype, rngs=rngs)
                     if stride != 1 or in_ch != out_ch else None)

  def __call__(self, x):
    s = x if self.shortcut is None else self.shortcut(x)
    return jax.nn.relu(self.conv3(self.conv2(self.conv1(x))) + s)


class ResNetStage(nnx.Module):

  def __init__(self, in_ch: int, width: int, num_blocks: int, stride: int, bottleneck: bool, *, dtype,
               rngs: nnx.Rngs):
    block = Bottleneck if bottleneck else BasicBlock
    blocks = []
    for i in range(num_blocks):
      blocks.append(block(in_ch, width, stride if i == 0 else 1, dtype=dtype, rngs=rngs))
      in_ch = width * block.expansion
    self.blocks = nnx.List(blocks)
    self.out_channels = in_ch

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x


class ResNet(nnx.Module):
  """ResNet backbone. `__call__(x [B, H, W, 3] float) -> {stride: [B, h, w, C]}` for strides 2, 4, 8, 16, 32."""

  def __init__(self, blocks: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (64, 128, 256, 512),
               bottleneck: bool = True, stem_width: int | None = None, *, remat: bool = False, dtype=None,
               rngs: nnx.Rngs):
    stem_width = stem_width or widths[0]
    self.stem = L.ConvBN(3, stem_width, 7, stride=2, act="relu", dtype=dtype, rngs=rngs)
    stages = []
    in_ch = stem_width
    for i, (n, w) in enumerate(zip(blocks, widths)):
      st = ResNetStage(in_ch, w, n, 1 if i == 0 else 2, bottleneck, dtype=dtype, rngs=rngs)
      stages.append(st)
      in_ch = st.out_channels
    self.stages = nnx.List(stages)
    self.remat = remat
    self.out_channels = {2: stem_width, **{2 ** (i + 2): s.out_channels for i, s in enumerate(stages)}}

  def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
    x = self.stem(x)
    feats = {2: x}
    x = L.max_pool_3x3(x)
    for i, st in enumerate(self.stages):
      x = L.maybe_remat(st, self.remat, x)
      feats[2 ** (i + 2)] = x
    return feats
