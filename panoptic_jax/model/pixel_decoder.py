"""kMaX pixel decoder: axial-attention and bottleneck block groups from stride 32 up to stride 4 (or 2).

Per stage i (coarse to fine): LayerNorm(backbone feature) -> [stage 0: the block group directly; later stages:
resized fusion of the previous stage output with the normed feature, then the block group]. Axial blocks use filters
`[2f, f, 4f]` (8 heads, global attention along H then W with relative positions, span capped at 255); bottleneck
blocks `[f, f, 4f]`. Every block starts with GELU and ends with a zero-init BatchNorm on its last 1x1 conv.

Relative positions: each axis has three tables `[2 * 255 - 1, depth]` (query, key, value). The `[L, L, depth]`
per-pair embedding is built with slice / tile / reshape only (no gather), so it is cheap, differentiates without a
scatter, and exports to any runtime.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from panoptic_jax import ops
from panoptic_jax.model import layers as L
from panoptic_jax.model import sharding_rules as ax

MAX_SPAN = 255


def relative_embeddings(table: jax.Array, length: int) -> jax.Array:
  """`[2 * MAX_SPAN - 1, d]` table -> `[L, L, d]` with `out[l, m] = table[m - l + MAX_SPAN - 1]` (no gather)."""
  if length > MAX_SPAN:
    raise ValueError(f"axial attention over {length} positions exceeds the relative-position span {MAX_SPAN}; "
                     "use a smaller input or apply axial blocks at a coarser stride")
  n = length
  window = table[MAX_SPAN - n:MAX_SPAN + n - 1]          # 2n - 1 rows; row r <-> distance r - (n - 1)
  if n == 1:
    return window[None]
  tiled = jnp.tile(window, (2 * n, 1))                     # 2n (2n - 1) rows
  rows = tiled[:n * (4 * n - 3)].reshape(n, 4 * n - 3, -1)  # row l starts at distance -l (mod 2n - 1)
  return rows[:, n - 1:2 * n - 1]


class AxialAttention(nnx.Module):
  """Multi-head attention along axis 1 of `[B, L, S, C]` (S is a batch-like axis) with relative positions."""

  def __init__(self, in_ch: int, key_depth: int, value_depth: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    if key_depth % num_heads or value_depth % num_heads:
      raise ValueError(f"axial attention depths {key_depth}/{value_depth} must divide by {num_heads} heads")
    self.k, self.v, self.n = key_depth, value_depth, num_heads
    self.qkv = L.dense(in_ch, 2 * key_depth + value_depth, kernel_init=L.trunc_normal(in_ch ** -0.5),
                       dtype=dtype, rngs=rngs)
    self.bn_qkv = L.batch_norm(2 * key_depth + value_depth, dtype=dtype, rngs=rngs)
    self.bn_similarity = L.batch_norm(3 * num_heads, axis=2, dtype=dtype, rngs=rngs)
    self.bn_output = L.batch_norm(2 * value_depth, dtype=dtype, rngs=rngs)
    init = nnx.with_partitioning(L.trunc_normal(1.0), (ax.RELPOS, ax.EMBED))
    span = 2 * MAX_SPAN - 1
    self.query_rpe = nnx.Param(init(rngs.params(), (span, key_depth // num_heads)))
    self.key_rpe = nnx.Param(init(rngs.params(), (span, key_depth // num_heads)))
    self.value_rpe = nnx.Param(init(rngs.params(), (span, value_depth // num_heads)))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, s, _ = x.shape
    n = self.n
    qkv = self.bn_qkv(self.qkv(x))
    q, k, v = jnp.split(qkv, [self.k, 2 * self.k], axis=-1)
    q = q.reshape(b, length, s, n, -1)
    k = k.reshape(b, length, s, n, -1)
    v = v.reshape(b, length, s, n, -1)
    cdt = q.dtype
    rq = relative_embeddings(self.query_rpe[...], length).astype(cdt)
    rk = relative_embeddings(self.key_rpe[...], length).astype(cdt)
    rv = relative_embeddings(self.value_rpe[...], length).astype(cdt)
    content = jnp.einsum("blsnd,bmsnd->bsnlm", q, k)
    q_pos = jnp.einsum("blsnd,lmd->bsnlm", q, rq)
    k_pos = jnp.einsum("bmsnd,lmd->bsnlm", k, rk)
    sim = self.bn_similarity.sum_of_parts([content, q_pos, k_pos])  # [b, s, n, l, m]
    w = jax.nn.softmax(sim.astype(jnp.float32), axis=-1).astype(cdt)
    out_c = jnp.einsum("bsnlm,bmsnd->blsnd", w, v).reshape(b, length, s, self.v)
    out_p = jnp.einsum("bsnlm,lmd->blsnd", w, rv).reshape(b, length, s, self.v)
    return self.bn_output.sum_of_parts([out_c, out_p])


class AxialAttention2D(nnx.Module):
  """Height axis then width axis, `[B, H, W, C] -> [B, H, W, value_depth]`."""

  def __init__(self, in_ch: int, filters: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.height = AxialAttention(in_ch, filters, 2 * filters, num_heads, dtype=dtype, rngs=rngs)
    self.width = AxialAttention(2 * filters, filters, 2 * filters, num_heads, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = self.height(x)
    x = self.width(x.transpose(0, 2, 1, 3))
    return x.transpose(0, 2, 1, 3)


class DecoderBlock(nnx.Module):
  """GELU -> 1x1 (f0) -> [axial attention + GELU | 3x3 conv] -> 1x1 (f2, zero-init BN) -> drop-path + shortcut."""

  def __init__(self, in_ch: int, filters: Sequence[int], block_type: str, num_heads: int, drop_path: float, *,
               dtype, rngs: nnx.Rngs):
    f0, f1, f2 = filters
    self.block_type = block_type
    self.conv1 = L.ConvBN(in_ch, f0, 1, act="gelu", dtype=dtype, rngs=rngs)
    if block_type == "axial":
      self.attention = AxialAttention2D(f0, f1, num_heads, dtype=dtype, rngs=rngs)
      mid = 2 * f1
    elif block_type == "bottleneck":
      self.conv2 = L.ConvBN(f0, f1, 3, act="gelu", dtype=dtype, rngs=rngs)
      mid = f1
    else:
      raise ValueError(f"pixel decoder block type {block_type!r}; expected 'axial' or 'bottleneck'")
    self.conv3 = L.ConvBN(mid, f2, 1, bn_scale_init=0.0, dtype=dtype, rngs=rngs)
    self.shortcut = L.ConvBN(in_ch, f2, 1, dtype=dtype, rngs=rngs) if in_ch != f2 else None
    self.drop_path = L.Dropout(drop_path, per_sample=True, rngs=rngs)

  def __call__(self, x):
    x = L.gelu(x)
    shortcut = x if self.shortcut is None else self.shortcut(x)
    x = self.conv1(x)
    if self.block_type == "axial":
      x = L.gelu(self.attention(x))
    else:
      x = self.conv2(x)
    x = self.conv3(x)
    return self.drop_path(x) + shortcut


class BlockGroup(nnx.Module):

  def __init__(self, in_ch: int, width: int, num_blocks: int, block_type: str, num_heads: int, drop_path: float,
               *, dtype, rngs: nnx.Rngs):
    filters = (2 * width, width, 4 * width) if block_type == "axial" else (width, width, 4 * width)
    blocks = []
    for _ in range(num_blocks):
      blocks.append(DecoderBlock(in_ch, filters, block_type, num_heads, drop_path, dtype=dtype, rngs=rngs))
      in_ch = filters[-1]
    self.blocks = nnx.List(blocks)
    self.out_channels = filters[-1]

  def __call__(self, x):
    for b in self.blocks:
      x = b(x)
    return x


class ResizedFuse(nnx.Module):
  """GELU -> 1x1 conv + BN on each side (when its width differs), bilinear-resize the coarse one, add."""

  def __init__(self, low_ch: int, high_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs):
    self.low = L.ConvBN(low_ch, out_ch, 1, dtype=dtype, rngs=rngs) if low_ch != out_ch else None
    self.high = L.ConvBN(high_ch, out_ch, 1, dtype=dtype, rngs=rngs) if high_ch != out_ch else None

  def __call__(self, low, high):
    if self.low is not None:
      low = self.low(L.gelu(low))
    low = ops.resize_bilinear(low, high.shape[1:3])
    if self.high is not None:
      high = self.high(L.gelu(high))
    return low + high


class PixelDecoder(nnx.Module):
  """`__call__(features {stride: [B, h, w, C]})` -> (panoptic feature at the finest stride, [stride 32, 16, 8
  decoder features] for the transformer decoder).

  `strides` lists the backbone strides consumed, coarse to fine, e.g. (32, 16, 8, 4) or (32, 16, 8, 4, 2); the
  features at the strides in `pooled` are max-pooled (3x3, stride 2) first, which doubles their stride (the PyTorch
  port's Cityscapes models read the ResNet stem after its max-pooling: strides (32, 16, 8, 2, 4), pooled (2,)).
  """

  def __init__(self, in_channels: dict[int, int], strides: Sequence[int], widths: Sequence[int],
               blocks: Sequence[int], types: Sequence[str], num_heads: int = 8, drop_path: float = 0.0, *,
               pooled: Sequence[int] = (), remat: bool = False, dtype=None, rngs: nnx.Rngs):
    if not (len(strides) == len(widths) == len(blocks) == len(types)):
      raise ValueError(f"pixel decoder: strides {strides}, widths {widths}, blocks {blocks}, types {types} "
                       "must have equal lengths")
    missing = [s for s in strides if s not in in_channels]
    if missing:
      raise ValueError(f"pixel decoder needs backbone features at strides {missing}; the backbone gives "
                       f"{sorted(in_channels)}")
    self.strides = tuple(strides)
    self.pooled = tuple(pooled)
    self.in_norms = nnx.List([L.layer_norm(in_channels[s], dtype=dtype, rngs=rngs) for s in strides])
    stages, fuses = [], []
    prev = None
    for i, s in enumerate(strides):
      stage_in = in_channels[s] if i == 0 else widths[i]
      if i > 0:
        fuses.append(ResizedFuse(prev, in_channels[s], widths[i], dtype=dtype, rngs=rngs))
      st = BlockGroup(stage_in, widths[i], blocks[i], types[i], num_heads, drop_path, dtype=dtype, rngs=rngs)
      stages.append(st)
      prev = st.out_channels
    self.stages = nnx.List(stages)
    self.fuses = nnx.List(fuses)
    self.out_channels = [st.out_channels for st in stages]
    self.remat = remat

  def __call__(self, features: dict[int, jax.Array]):
    outs = []
    normed = [norm(L.max_pool_3x3(features[s]) if s in self.pooled else features[s])
              for norm, s in zip(self.in_norms, self.strides)]
    x = normed[0]
    for i in range(len(self.strides)):
      if i > 0:
        x = self.fuses[i - 1](x, normed[i])
      x = L.maybe_remat(self.stages[i], self.remat, x)
      outs.append(x)
    return outs[-1], outs[:3]
