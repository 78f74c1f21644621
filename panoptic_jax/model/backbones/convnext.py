"""ConvNeXt (Liu et al. 2022), channels-last, with stochastic depth; timm/official parameter counts.

T: depths (3, 3, 9, 3), dims (96, 192, 384, 768); S: (3, 3, 27, 3), same dims; B: (3, 3, 27, 3),
(128, 256, 512, 1024); L: (3, 3, 27, 3), (192, 384, 768, 1536). ConvNeXt-T without its classifier has 27.82M
parameters.

Odd inputs (`32 * k + 1`) are padded like the kMaX PyTorch port (1 before / 2 after for the 4x4 stem, 0 / 1 for the
2x2 downsamplers), so every feature has size `(H - 1) // stride + 1`. Returns `{4, 8, 16, 32}` features; ConvNeXt has
no stride-2 feature (output stride 2 needs a ResNet backbone).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from panoptic_jax.model import layers as L
from panoptic_jax.model import sharding_rules as ax


class ConvNeXtBlock(nnx.Module):
  """dw 7x7 -> LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale -> drop-path, residual."""

  def __init__(self, dim: int, drop_path: float, layer_scale: float = 1e-6, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(0.02)
    self.dwconv = L.conv(dim, dim, 7, groups=dim, use_bias=True, kernel_init=init, dtype=dtype, rngs=rngs)
    self.norm = L.layer_norm(dim, dtype=dtype, rngs=rngs)
    self.pwconv1 = L.dense(dim, 4 * dim, use_bias=True, kernel_init=init, out_axis=ax.MLP, dtype=dtype, rngs=rngs)
    self.pwconv2 = L.dense(4 * dim, dim, use_bias=True, kernel_init=init, in_axis=ax.MLP, dtype=dtype, rngs=rngs)
    self.gamma = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32), out_sharding=(ax.NORM,))
    self.drop_path = L.Dropout(drop_path, per_sample=True, rngs=rngs)

  def __call__(self, x):
    y = self.dwconv(x)
    y = self.pwconv2(L.gelu(self.pwconv1(self.norm(y))))
    y = y * self.gamma[...].astype(y.dtype)
    return x + self.drop_path(y)


class ConvNeXtStage(nnx.Module):

  def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: Sequence[float], first: bool, *, dtype,
               rngs: nnx.Rngs):
    init = nnx.initializers.truncated_normal(0.02)
    self.first = first
    if first:   # stem: conv 4x4 / 4 -> LayerNorm
      self.down_conv = L.conv(in_dim, dim, 4, stride=4, padding="VALID", use_bias=True, kernel_init=init,
                              dtype=dtype, rngs=rngs)
      self.down_norm = L.layer_norm(dim, dtype=dtype, rngs=rngs)
    else:       # LayerNorm -> conv 2x2 / 2
      self.down_norm = L.layer_norm(in_dim, dtype=dtype, rngs=rngs)
      self.down_conv = L.conv(in_dim, dim, 2, stride=2, padding="VALID", use_bias=True, kernel_init=init,
                              dtype=dtype, rngs=rngs)
    self.blocks = nnx.List([ConvNeXtBlock(dim, drop_paths[i], dtype=dtype, rngs=rngs) for i in range(depth)])

  def __call__(self, x):
    if self.first:
      x = jnp.pad(x, ((0, 0), (1, 2), (1, 2), (0, 0)))
      x = self.down_norm(self.down_conv(x))
    else:
      x = jnp.pad(self.down_norm(x), ((0, 0), (0, 1), (0, 1), (0, 0)))
      x = self.down_conv(x)
    for b in self.blocks:
      x = b(x)
    return x


class ConvNeXt(nnx.Module):
  """`__call__(x [B, H, W, 3]) -> {4, 8, 16, 32: [B, h, w, C]}`. `drop_path` is the final (max) rate."""

  def __init__(self, depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
               drop_path: float = 0.0, *, remat: bool = False, dtype=None, rngs: nnx.Rngs):
    total = sum(depths)
    rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
    stages, cur, in_dim = [], 0, 3
    for i, (d, c) in enumerate(zip(depths, dims)):
      stages.append(ConvNeXtStage(in_dim, c, d, rates[cur:cur + d], i == 0, dtype=dtype, rngs=rngs))
      cur += d
      in_dim = c
    self.stages = nnx.List(stages)
    self.remat = remat
    self.out_channels = {2 ** (i + 2): c for i, c in enumerate(dims)}

  def __call__(self, x: jax.Array) -> dict[int, jax.Array]:
    feats = {}
    for i, st in enumerate(self.stages):
      x = L.maybe_remat(st, self.remat, x)
      feats[2 ** (i + 2)] = x
    return feats
