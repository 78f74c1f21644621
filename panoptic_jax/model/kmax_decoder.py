"""kMaX transformer decoder: cluster centres refined by k-means cross-attention over the pixel features.

Blocks are applied to the pixel-decoder features at strides 32, 16, 8 (default two each). One block:

    pixel = 1x1(GELU(pixel feature)) + BN + GELU;  centres' = 1x1(centres) + BN + GELU
    predictions = KMaXPredictor(centres', centres', pixel)            # auxiliary (deep-supervision) outputs
    assignment = one_hot(argmax_N(stop_gradient(mask_logits)))         # hard k-means assignment over clusters
    centres += drop_path(BN0(1x1(BN(sum_pixels assignment * value(pixel)))))      # k-means update (summed)
    centres += drop_path(BN0(1x1(GELU(BN(MHSA(q, k, v from centres')))))); centres = GELU(centres)
    centres += drop_path(FFN(centres)); centres = GELU(centres)

(BN0: zero-initialised gamma.) Self-attention Q/K/V come from the block's *input* centres (deeplab2 #157).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from panoptic_jax import ops
from panoptic_jax.model import layers as L
from panoptic_jax.model import sharding_rules as ax
from panoptic_jax.model.heads import KMaXPredictor


def kmeans_assignment(mask_logits: jax.Array) -> jax.Array:
  """`[B, H, W, N]` logits -> hard one-hot assignment of each pixel to its argmax cluster (no gradient)."""
  logits = jax.lax.stop_gradient(mask_logits)
  return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)


class KMaXBlock(nnx.Module):

  def __init__(self, pixel_ch: int, num_classes_with_void: int, *, query_ch: int = 256, bottleneck: int = 256,
               key_depth: int = 128, value_depth: int = 256, num_heads: int = 8, ffn: int = 2048,
               embed: int = 128, hidden: int = 256, drop_path: float = 0.0, dtype=None, rngs: nnx.Rngs):
    if key_depth % num_heads or value_depth % num_heads:
      raise ValueError(f"kMaX block depths {key_depth}/{value_depth} must divide by {num_heads} heads")
    self.k, self.v, self.n = key_depth, value_depth, num_heads
    std = bottleneck ** -0.5
    self.pixel_conv1 = L.ConvBN(pixel_ch, bottleneck, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.query_conv1 = L.ConvBN(query_ch, bottleneck, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.pixel_v = L.ConvBN(bottleneck, value_depth, 1, kernel_init=L.trunc_normal(std), dtype=dtype, rngs=rngs)
    self.predictor = KMaXPredictor(bottleneck, bottleneck, num_classes_with_void, hidden=hidden, embed=embed,
                                   dtype=dtype, rngs=rngs)
    self.kmeans_bn = L.batch_norm(value_depth, dtype=dtype, rngs=rngs)
    self.kmeans_conv3 = L.ConvBN(value_depth, query_ch, 1, bn_scale_init=0.0, dtype=dtype, rngs=rngs)
    self.qkv = L.ConvBN(bottleneck, 2 * key_depth + value_depth, 1, kernel_init=L.trunc_normal(std), dtype=dtype,
                        rngs=rngs)
    self.bn_similarity = L.batch_norm(num_heads, axis=1, dtype=dtype, rngs=rngs)
    self.bn_retrieved = L.batch_norm(value_depth, dtype=dtype, rngs=rngs)
    self.query_conv3 = L.ConvBN(value_depth, query_ch, 1, bn_scale_init=0.0, dtype=dtype, rngs=rngs)
    self.ffn1 = L.ConvBN(query_ch, ffn, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.ffn2 = L.ConvBN(ffn, query_ch, 1, bn_scale_init=0.0, dtype=dtype, rngs=rngs)
    self.drop_kmeans = L.Dropout(drop_path, per_sample=True, rngs=rngs)
    self.drop_attn = L.Dropout(drop_path, per_sample=True, rngs=rngs)
    self.drop_ffn = L.Dropout(drop_path, per_sample=True, rngs=rngs)

  def __call__(self, pixel: jax.Array, centres: jax.Array):
    """`pixel [B, H, W, C]`, `centres [B, N, Q]` -> (new centres `[B, N, Q]`, predictions of this block)."""
    b, n_slots, _ = centres.shape
    pixel_space = self.pixel_conv1(L.gelu(pixel))
    query_space = self.query_conv1(centres)

    # k-means cross-attention.
    pixel_value = self.pixel_v(pixel_space)
    pred = self.predictor(query_space, query_space, pixel_space)
    assign = kmeans_assignment(pred["mask_logits"])
    update = jnp.einsum("bhwn,bhwv->bnv", assign, pixel_value.astype(jnp.float32)).astype(centres.dtype)
    update = self.kmeans_conv3(self.kmeans_bn(update))
    centres = centres + self.drop_kmeans(update)

    # Self-attention among the centres (Q/K/V from the block's input centres).
    qkv = self.qkv(query_space)
    q, k, v = jnp.split(qkv, [self.k, 2 * self.k], axis=-1)
    q = q.reshape(b, n_slots, self.n, -1)
    k = k.reshape(b, n_slots, self.n, -1)
    v = v.reshape(b, n_slots, self.n, -1)
    sim = self.bn_similarity(jnp.einsum("blhd,bmhd->bhlm", q, k))
    w = jax.nn.softmax(sim.astype(jnp.float32), axis=-1).astype(v.dtype)
    att = jnp.einsum("bhlm,bmhd->blhd", w, v).reshape(b, n_slots, self.v)
    att = self.query_conv3(L.gelu(self.bn_retrieved(att)))
    centres = L.gelu(centres + self.drop_attn(att))

    # FFN.
    centres = L.gelu(centres + self.drop_ffn(self.ffn2(self.ffn1(centres))))
    return centres, pred


class KMaXTransformerDecoder(nnx.Module):
  """`__call__(multi_scale [stride 32, 16, 8 features], panoptic_feature)` -> final predictions and the per-block
  auxiliary predictions (mask logits resized to the final resolution, pixel features at the block's stride)."""

  def __init__(self, in_channels: Sequence[int], panoptic_channels: int, num_classes_with_void: int, *,
               num_slots: int = 128, blocks: Sequence[int] = (2, 2, 2), query_ch: int = 256,
               bottleneck: int = 256, key_depth: int = 128, value_depth: int = 256, num_heads: int = 8,
               ffn: int = 2048, embed: int = 128, hidden: int = 256, drop_path: float = 0.0,
               remat: bool = False, dtype=None, rngs: nnx.Rngs):
    layers = []
    for i, nb in enumerate(blocks):
      for _ in range(nb):
        layers.append(KMaXBlock(in_channels[i], num_classes_with_void, query_ch=query_ch, bottleneck=bottleneck,
                                key_depth=key_depth, value_depth=value_depth, num_heads=num_heads, ffn=ffn,
                                embed=embed, hidden=hidden, drop_path=drop_path, dtype=dtype, rngs=rngs))
    self.layers = nnx.List(layers)
    self.blocks = tuple(blocks)
    init = nnx.with_partitioning(L.trunc_normal(1.0), (ax.CLUSTERS, ax.EMBED))
    self.cluster_centers = nnx.Param(init(rngs.params(), (num_slots, query_ch)))
    self.class_proj = L.ConvBN(query_ch, query_ch, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.mask_proj = L.ConvBN(query_ch, query_ch, 1, act="gelu", dtype=dtype, rngs=rngs)
    self.predictor = KMaXPredictor(panoptic_channels, query_ch, num_classes_with_void, hidden=hidden, embed=embed,
                                   dtype=dtype, rngs=rngs)
    self.remat = remat
    self.dtype = dtype

  def __call__(self, multi_scale: Sequence[jax.Array], panoptic: jax.Array):
    b = panoptic.shape[0]
    dtype = self.dtype or jnp.float32
    centres = jnp.broadcast_to(self.cluster_centers[...].astype(dtype)[None],
                               (b,) + self.cluster_centers.shape)
    aux = []
    idx = 0
    for i, nb in enumerate(self.blocks):
      for _ in range(nb):
        centres, pred = L.maybe_remat(self.layers[idx], self.remat, multi_scale[i], centres)
        aux.append(pred)
        idx += 1
    final = self.predictor(self.mask_proj(centres), self.class_proj(centres), panoptic)
    # Pixel features stay at the block's stride: the losses read 4096 of their pixels (`ops.sample_bilinear`).
    size = final["mask_logits"].shape[1:3]
    aux = tuple({**a, "mask_logits": ops.resize_bilinear(a["mask_logits"], size)} for a in aux)
    return final, aux
