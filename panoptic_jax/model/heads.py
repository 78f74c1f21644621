"""Prediction heads: the kMaX predictor (pixel embedding, mask embedding, mask logits, class logits) and the
auxiliary semantic head (training only)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from panoptic_jax import ops
from panoptic_jax.model import layers as L
from panoptic_jax.model import sharding_rules as ax

VOID_PRIOR = 0.9


def void_bias(num_classes_with_void: int) -> float:
  """Initial bias of the void logit: log((C - 1) * 0.9 / 0.1), C counting void (DeepLab2 `add_bias_towards_void`)."""
  return math.log((num_classes_with_void - 1) * VOID_PRIOR / (1.0 - VOID_PRIOR))


class KMaXPredictor(nnx.Module):
  """Pixel embedding (dw 5x5 + BN + GELU -> 1x1 hidden + BN + GELU -> 1x1 embed + BN, L2-normalised), mask embedding
  (1x1 + BN), mask logits = pixel . mask embedding -> 1-channel BN (gamma 0.1), class logits with a void bias.

  `__call__(mask_emb [B, N, Q], class_emb [B, N, Q], pixels [B, H, W, P])` -> dict with `class_logits [B, N, K+1]`,
  `mask_logits [B, H, W, N]`, `pixel_feature [B, H, W, E]`.
  """

  def __init__(self, pixel_ch: int, query_ch: int, num_classes_with_void: int, *, hidden: int = 256,
               embed: int = 128, dtype=None, rngs: nnx.Rngs):
    self.pixel_dw = L.ConvBN(pixel_ch, pixel_ch, 5, groups=pixel_ch, act="gelu",
                             kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype, rngs=rngs)
    self.pixel_hidden = L.ConvBN(pixel_ch, hidden, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.pixel_embed = L.ConvBN(hidden, embed, 1, use_bias=True, kernel_init=L.trunc_normal(0.01), dtype=dtype,
                                rngs=rngs)
    self.mask_head = L.ConvBN(query_ch, embed, 1, dtype=dtype, rngs=rngs)
    self.class_head = L.dense(query_ch, num_classes_with_void, use_bias=True, kernel_init=L.trunc_normal(0.01),
                              out_axis=ax.CLASSES, dtype=dtype, rngs=rngs)
    self.mask_norm = L.batch_norm(1, scale_init=0.1, dtype=dtype, rngs=rngs)
    self.num_classes_with_void = num_classes_with_void

  def __call__(self, mask_emb, class_emb, pixels):
    p = self.pixel_embed(self.pixel_hidden(self.pixel_dw(pixels)))
    p32 = p.astype(jnp.float32)
    p = (p32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(p32 * p32, axis=-1, keepdims=True), 1e-24))).astype(p.dtype)
    cls = self.class_head(class_emb).astype(jnp.float32)
    cls = cls.at[..., -1].add(void_bias(self.num_classes_with_void))
    kernel = self.mask_head(mask_emb)
    logits = jnp.einsum("bhwd,bnd->bhwn", p, kernel)
    logits = self.mask_norm(logits[..., None])[..., 0]
    return {"class_logits": cls, "mask_logits": logits.astype(jnp.float32),
            "pixel_feature": p.astype(jnp.float32)}


class ASPP(nnx.Module):
  """1x1, three dilated 3x3 and an image-pooling branch (each conv + BN + GELU), concatenated, 1x1 projection,
  dropout."""

  def __init__(self, in_ch: int, ch: int, rates: Sequence[int], dropout: float = 0.1, *, dtype, rngs: nnx.Rngs):
    self.conv0 = L.ConvBN(in_ch, ch, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.atrous = nnx.List([L.ConvBN(in_ch, ch, 3, dilation=r, act="gelu", dtype=dtype, rngs=rngs) for r in rates])
    self.pool = L.ConvBN(in_ch, ch, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.proj = L.ConvBN(ch * (2 + len(rates)), ch, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.dropout = L.Dropout(dropout, rngs=rngs)

  def __call__(self, x):
    pooled = self.pool(jnp.mean(x, axis=(1, 2), keepdims=True))
    branches = [self.conv0(x)] + [a(x) for a in self.atrous] + [jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[3:])]
    return self.dropout(self.proj(jnp.concatenate(branches, axis=-1)))


class SemanticDecoderHead(nnx.Module):
  """DeepLabv3+-style auxiliary semantic decoder (COCO / ADE20K): ASPP on the stride-32 backbone feature, fused with
  projected stride-8 (-> 64) and stride-4 (-> 32) features (dw 5x5 + 1x1 each), then dw 5x5 + 1x1 + classifier.
  `__call__({stride: feature})` -> `[B, H/4, W/4, K+1]` logits (strides from `low_strides`)."""

  def __init__(self, in_channels: dict[int, int], num_classes_with_void: int, *, ch: int = 256,
               rates: Sequence[int] = (6, 12, 18), low_strides: Sequence[int] = (8, 4),
               low_proj: Sequence[int] = (64, 32), dtype=None, rngs: nnx.Rngs):
    self.aspp = ASPP(in_channels[32], ch, rates, dtype=dtype, rngs=rngs)
    self.low_strides = tuple(low_strides)
    self.proj = nnx.List([L.ConvBN(in_channels[s], p, 1, act="gelu", dtype=dtype, rngs=rngs)
                          for s, p in zip(low_strides, low_proj)])
    self.fuse_dw = nnx.List([L.ConvBN(ch + p, ch + p, 5, groups=ch + p, act="gelu",
                                      kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype, rngs=rngs)
                             for p in low_proj])
    self.fuse_pw = nnx.List([L.ConvBN(ch + p, ch, 1, act="gelu", dtype=dtype, rngs=rngs) for p in low_proj])
    self.head_dw = L.ConvBN(ch, ch, 5, groups=ch, act="gelu", kernel_init=nnx.initializers.xavier_uniform(),
                            dtype=dtype, rngs=rngs)
    self.head_pw = L.ConvBN(ch, ch, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.classifier = L.dense(ch, num_classes_with_void, use_bias=True, kernel_init=L.trunc_normal(0.01),
                              out_axis=ax.CLASSES, dtype=dtype, rngs=rngs)

  def __call__(self, features):
    x = self.aspp(features[32])
    for s, proj, dw, pw in zip(self.low_strides, self.proj, self.fuse_dw, self.fuse_pw):
      low = proj(features[s])
      x = ops.resize_bilinear(x, low.shape[1:3])
      x = pw(dw(jnp.concatenate([x, low], axis=-1)))
    return self.classifier(self.head_pw(self.head_dw(x))).astype(jnp.float32)


class SemanticSimpleHead(nnx.Module):
  """Head-only auxiliary semantic predictor (Cityscapes): dw 5x5 + 1x1 + classifier on the stride-32 feature."""

  def __init__(self, in_channels: dict[int, int], num_classes_with_void: int, *, ch: int = 256, dtype=None,
               rngs: nnx.Rngs):
    c = in_channels[32]
    self.dw = L.ConvBN(c, c, 5, groups=c, act="gelu", kernel_init=nnx.initializers.xavier_uniform(), dtype=dtype,
                       rngs=rngs)
    self.pw = L.ConvBN(c, ch, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.classifier = L.dense(ch, num_classes_with_void, use_bias=True, kernel_init=L.trunc_normal(0.01),
                              out_axis=ax.CLASSES, dtype=dtype, rngs=rngs)

  def __call__(self, features):
    return self.classifier(self.pw(self.dw(features[32]))).astype(jnp.float32)
