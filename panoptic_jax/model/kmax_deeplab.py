"""kMaX-DeepLab assembly and the model presets (the one place that holds architecture numbers).

    model = build_model("kmax_r50_coco", num_classes=133, rngs=nnx.Rngs(0))
    outputs = model(images)            # images [B, H, W, 3], uint8 or float in 0..255

Output contract (`KMaXDeepLab.__call__`), with K = num_classes (the void class is index K), N = num_slots,
`h = (H - 1) // output_stride + 1` (exact for the `output_stride * k + 1` crops kMaX uses), all float32:

    "class_logits":  [B, N, K + 1]   per-slot class logits, last = void
    "mask_logits":   [B, h, w, N]    per-pixel slot logits at the output stride
    "pixel_feature": [B, h, w, E]    L2-normalised pixel embedding (E = 128) at the output stride
    "aux_outputs":   tuple of one dict per transformer block (6), same three keys; deep supervision. Mask logits
                     are bilinearly resized to [h, w] (`ops.resize_bilinear`); pixel features stay at the
                     block's stride (32, 16, 8), the losses upsample them only at the pixels they sample
    "semantic_logits": [B, hs, ws, K + 1]   auxiliary semantic logits, only while training (`model.train()`) and
                     when the preset has a semantic head (stride 4 for the COCO decoder, 32 for the Cityscapes head)

Modes: `model.train()` (batch statistics, drop-path, dropout, semantic head) / `model.eval()` (running statistics,
deterministic, no semantic head). `__call__(..., with_semantic=True/False)` overrides the semantic-head default.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from panoptic_jax.model.backbones.convnext import ConvNeXt
from panoptic_jax.model.backbones.resnet import ResNet
from panoptic_jax.model.heads import SemanticDecoderHead, SemanticSimpleHead
from panoptic_jax.model.kmax_decoder import KMaXTransformerDecoder
from panoptic_jax.model.pixel_decoder import PixelDecoder


# The coarsest feature stride (the backbone's last stage). On inputs of `MAX_STRIDE * k + 1` pixels per side every
# stride's features lie on the image's pixel grid (feature i of stride s on pixel s * i), which the corner-aligned
# resizes between strides assume; kMaX's crops are of this form (641, 1281, 1025x2049).
MAX_STRIDE = 32


@dataclasses.dataclass(frozen=True)
class KMaXConfig:
  """Every architecture number of a kMaX-DeepLab model (plain numbers / strings / tuples)."""
  # Pixel encoder.
  backbone: str = "resnet"                       # "resnet" | "convnext"
  backbone_blocks: tuple[int, ...] = (3, 4, 6, 3)
  backbone_widths: tuple[int, ...] = (64, 128, 256, 512)   # ResNet bottleneck widths / ConvNeXt dims
  resnet_bottleneck: bool = True                 # False: basic blocks (ResNet-18/34)
  backbone_drop_path: float = 0.0                # 1 - keep probability (ConvNeXt only)
  # Pixel decoder (coarse to fine, starting at stride 32).
  output_stride: int = 4                         # 4 (COCO, ADE20K) or 2 (Cityscapes)
  # The PyTorch port's Cityscapes arrangement: its 4th decoder stage reads the ResNet stem after max-pooling (stride
  # 4), its 5th res2, so its output stride is 4 (DeepLab2: res2, then the stem before pooling, output stride 2).
  pooled_stem: bool = False
  pixel_decoder_widths: tuple[int, ...] = (512, 256, 128, 64)
  pixel_decoder_blocks: tuple[int, ...] = (1, 5, 1, 1)
  pixel_decoder_types: tuple[str, ...] = ("axial", "axial", "bottleneck", "bottleneck")
  pixel_decoder_drop_path: float = 0.0
  num_heads: int = 8
  # Transformer decoder.
  num_slots: int = 128
  decoder_blocks: tuple[int, ...] = (2, 2, 2)    # at strides 32, 16, 8
  query_dim: int = 256
  bottleneck_dim: int = 256
  key_depth: int = 128
  value_depth: int = 256
  ffn_dim: int = 2048
  decoder_drop_path: float = 0.2                 # 1 - keep probability 0.8
  # Heads.
  pixel_hidden_dim: int = 256
  embed_dim: int = 128
  semantic_head: str = "decoder"                 # "decoder" (ASPP + fusion) | "simple" | "none"
  aspp_dim: int = 256
  aspp_rates: tuple[int, ...] = (6, 12, 18)
  semantic_low_strides: tuple[int, ...] = (8, 4)
  semantic_low_dims: tuple[int, ...] = (64, 32)
  # Numerics / memory.
  dtype: str = "float32"                         # compute dtype ("bfloat16" for mixed precision); params f32
  remat: bool = False                            # rematerialise each backbone / decoder stage and kMaX block

  def replace(self, **kw) -> "KMaXConfig":
    return dataclasses.replace(self, **kw)


_R50 = KMaXConfig()
_CONVNEXT_T = _R50.replace(backbone="convnext", backbone_blocks=(3, 3, 9, 3), backbone_widths=(96, 192, 384, 768),
                           backbone_drop_path=0.3)
_TINY = KMaXConfig(
    backbone_blocks=(1, 1, 1, 1), backbone_widths=(8, 16, 16, 16),
    pixel_decoder_widths=(32, 16, 16, 8), pixel_decoder_blocks=(1, 1, 1, 1), num_heads=4,
    num_slots=16, decoder_blocks=(1, 1, 1), query_dim=32, bottleneck_dim=32, key_depth=16, value_depth=32,
    ffn_dim=64, pixel_hidden_dim=32, embed_dim=16, aspp_dim=16, semantic_low_dims=(8, 8))
# The demo's model: kmax_tiny widened where the feature maps are small (strides 8-32, the 16 cluster centres), which
# costs little time on a CPU; the stride-4 widths and the pixel embedding stay tiny.
_SMALL = _TINY.replace(backbone_widths=(16, 32, 48, 64), pixel_decoder_widths=(64, 48, 32, 16), query_dim=64,
                       bottleneck_dim=64, key_depth=32, value_depth=64, ffn_dim=256, aspp_dim=32)


def _cityscapes(cfg: KMaXConfig, extra_width: int) -> KMaXConfig:
  """Output stride 2 (one more bottleneck stage on the stride-2 stem), 256 slots, head-only semantic predictor."""
  return cfg.replace(output_stride=2, pixel_decoder_widths=cfg.pixel_decoder_widths + (extra_width,),
                     pixel_decoder_blocks=cfg.pixel_decoder_blocks + (1,),
                     pixel_decoder_types=cfg.pixel_decoder_types + ("bottleneck",),
                     num_slots=2 * cfg.num_slots, semantic_head="simple")


PRESETS: dict[str, KMaXConfig] = {
    "kmax_r50_coco": _R50,
    "kmax_r50_cityscapes": _cityscapes(_R50, 32),
    # The architecture of the port's released Cityscapes R50 model (panoptic_jax/weights/kmax_port.py).
    "kmax_r50_cityscapes_port": _cityscapes(_R50, 32).replace(pooled_stem=True, output_stride=4),
    "kmax_convnext_t_coco": _CONVNEXT_T,
    "kmax_convnext_s_coco": _CONVNEXT_T.replace(backbone_blocks=(3, 3, 27, 3), backbone_drop_path=0.4),
    "kmax_convnext_b_coco": _CONVNEXT_T.replace(backbone_blocks=(3, 3, 27, 3), backbone_widths=(128, 256, 512, 1024),
                                                backbone_drop_path=0.5),
    "kmax_convnext_l_coco": _CONVNEXT_T.replace(backbone_blocks=(3, 3, 27, 3), backbone_widths=(192, 384, 768, 1536),
                                                backbone_drop_path=0.6),
    "kmax_r18_coco": _R50.replace(backbone_blocks=(2, 2, 2, 2), resnet_bottleneck=False),
    "kmax_r101_coco": _R50.replace(backbone_blocks=(3, 4, 23, 3)),
    "kmax_tiny": _TINY,
    "kmax_small": _SMALL,
    "kmax_tiny_cityscapes": _cityscapes(_TINY, 8).replace(num_slots=_TINY.num_slots),
}

# Classes per dataset (without void): the published heads' sizes, for presets named after the dataset.
DATASET_CLASSES = {"coco": 133, "cityscapes": 19, "ade20k": 150}


def decoder_strides(cfg: KMaXConfig) -> tuple[int, ...]:
  """The backbone strides the pixel decoder reads, coarse to fine (the stem's 2 is max-pooled with `pooled_stem`)."""
  return (32, 16, 8, 2, 4) if cfg.pooled_stem else (32, 16, 8, 4, 2)[:len(cfg.pixel_decoder_widths)]


def default_num_classes(preset: str) -> int:
  """The classes (without void) of the dataset a preset is named after (`kmax_r50_cityscapes` -> 19); COCO's 133 for
  presets named after none (the command-line tools' default)."""
  return next((n for dataset, n in DATASET_CLASSES.items() if dataset in preset), DATASET_CLASSES["coco"])


def get_config(preset: str | KMaXConfig, **overrides) -> KMaXConfig:
  """A preset name or a `KMaXConfig`, with field overrides -> the checked `KMaXConfig`."""
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
    preset = PRESETS[preset]
  fields = {f.name for f in dataclasses.fields(KMaXConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"model config: unknown fields {unknown}; expected some of {sorted(fields)}")
  cfg = preset.replace(**overrides)
  if cfg.output_stride not in (2, 4):
    raise ValueError(f"model config output_stride: expected 2 or 4, found {cfg.output_stride}")
  stages = 5 if cfg.pooled_stem else {4: 4, 2: 5}[cfg.output_stride]
  if len(cfg.pixel_decoder_widths) != stages:
    raise ValueError(f"model config: output_stride {cfg.output_stride}{' with pooled_stem' * cfg.pooled_stem} needs "
                     f"{stages} pixel-decoder stages; found pixel_decoder_widths {cfg.pixel_decoder_widths}")
  if cfg.pooled_stem and (cfg.backbone != "resnet" or cfg.output_stride != 4):
    raise ValueError("model config pooled_stem: needs a ResNet backbone and output_stride 4 (the pooled stem and res2 "
                     f"are both at stride 4); found {cfg.backbone}, output_stride {cfg.output_stride}")
  if cfg.backbone == "convnext" and cfg.output_stride == 2:
    raise ValueError("model config: output_stride 2 needs the stride-2 stem of a ResNet backbone; ConvNeXt's "
                     "finest feature is at stride 4")
  if cfg.semantic_head not in ("decoder", "simple", "none"):
    raise ValueError(f"model config semantic_head: expected decoder, simple or none; found {cfg.semantic_head!r}")
  if cfg.num_slots < 1:
    raise ValueError(f"model config num_slots: expected a positive number of mask slots, found {cfg.num_slots}")
  return cfg


class KMaXDeepLab(nnx.Module):
  """Backbone -> pixel decoder -> kMaX transformer decoder + heads (+ auxiliary semantic head). See module doc."""

  def __init__(self, cfg: KMaXConfig, num_classes: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.num_classes = num_classes
    dtype = None if cfg.dtype in (None, "float32") else jnp.dtype(cfg.dtype)
    self.dtype = dtype
    if cfg.backbone == "resnet":
      self.backbone = ResNet(cfg.backbone_blocks, cfg.backbone_widths, cfg.resnet_bottleneck, remat=cfg.remat,
                             dtype=dtype, rngs=rngs)
    elif cfg.backbone == "convnext":
      self.backbone = ConvNeXt(cfg.backbone_blocks, cfg.backbone_widths, cfg.backbone_drop_path, remat=cfg.remat,
                               dtype=dtype, rngs=rngs)
    else:
      raise ValueError(f"model config backbone: expected resnet or convnext, found {cfg.backbone!r}")
    in_ch = self.backbone.out_channels
    self.pixel_decoder = PixelDecoder(in_ch, decoder_strides(cfg), cfg.pixel_decoder_widths,
                                      cfg.pixel_decoder_blocks, cfg.pixel_decoder_types, cfg.num_heads,
                                      cfg.pixel_decoder_drop_path, pooled=(2,) if cfg.pooled_stem else (),
                                      remat=cfg.remat, dtype=dtype, rngs=rngs)
    dec_ch = self.pixel_decoder.out_channels
    k1 = num_classes + 1
    self.transformer_decoder = KMaXTransformerDecoder(
        dec_ch[:3], dec_ch[-1], k1, num_slots=cfg.num_slots, blocks=cfg.decoder_blocks, query_ch=cfg.query_dim,
        bottleneck=cfg.bottleneck_dim, key_depth=cfg.key_depth, value_depth=cfg.value_depth,
        num_heads=cfg.num_heads, ffn=cfg.ffn_dim, embed=cfg.embed_dim, hidden=cfg.pixel_hidden_dim,
        drop_path=cfg.decoder_drop_path, remat=cfg.remat, dtype=dtype, rngs=rngs)
    if cfg.semantic_head == "decoder":
      self.semantic_head = SemanticDecoderHead(in_ch, k1, ch=cfg.aspp_dim, rates=cfg.aspp_rates,
                                               low_strides=cfg.semantic_low_strides,
                                               low_proj=cfg.semantic_low_dims, dtype=dtype, rngs=rngs)
    elif cfg.semantic_head == "simple":
      self.semantic_head = SemanticSimpleHead(in_ch, k1, ch=cfg.aspp_dim, dtype=dtype, rngs=rngs)
    else:
      self.semantic_head = None
    self.deterministic = False   # set by model.train() / model.eval()

  def __call__(self, images: jax.Array, *, with_semantic: bool | None = None) -> dict[str, Any]:
    """`images [B, H, W, 3]` uint8 or float in 0..255 -> the output dict of the module docstring."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"model input: expected images [B, H, W, 3], found shape {images.shape}")
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if self.dtype is not None:
      x = x.astype(self.dtype)
    feats = self.backbone(x)
    panoptic, multi_scale = self.pixel_decoder(feats)
    final, aux = self.transformer_decoder(multi_scale, panoptic)
    out = dict(final)
    out["aux_outputs"] = aux
    if with_semantic is None:
      with_semantic = not self.deterministic
    if with_semantic and self.semantic_head is not None:
      out["semantic_logits"] = self.semantic_head(feats)
    return out


def build_model(preset: str | KMaXConfig, num_classes: int, *, rngs: nnx.Rngs, **overrides) -> KMaXDeepLab:
  """Builds a kMaX-DeepLab model from a preset name / config (+ field overrides).

  `num_classes` excludes void. Parameters carry logical axis names; inside `jax.set_mesh(mesh)` +
  `nnx.logical_axis_rules(rules)` they are created sharded, otherwise unsharded (metadata kept, see
  `sharding_rules.param_shardings`).
  """
  cfg = get_config(preset, **overrides)
  if num_classes < 1:
    raise ValueError(f"build_model: num_classes must be >= 1, found {num_classes}")
  if jax.sharding.get_abstract_mesh().empty:
    with nnx.use_eager_sharding(False):
      return KMaXDeepLab(cfg, num_classes, rngs=rngs)
  return KMaXDeepLab(cfg, num_classes, rngs=rngs)


class _ConcreteCountStream(nnx.RngStream):
  """An RngStream whose key/counter arithmetic runs eagerly even while tracing.

  Under `nnx.eval_shape` every counter update of a plain stream is a tracer, and flax compares shardings on each
  update, which makes JAX walk the whole trace each time (quadratic: ~20 s for R50). Keeping the counter concrete
  makes the abstract build take about a second; the initialisers themselves stay abstract.
  """

  def __call__(self) -> jax.Array:
    with jax.ensure_compile_time_eval():
      return super().__call__()


def _abstract_rngs(seed: int = 0) -> nnx.Rngs:
  with jax.ensure_compile_time_eval():
    rngs = nnx.Rngs(0)
    for tag in ("params", "dropout"):
      setattr(rngs, tag, _ConcreteCountStream(jax.random.fold_in(jax.random.key(seed), len(tag)), tag=tag))
  return rngs


def abstract_model(preset: str | KMaXConfig, num_classes: int, **overrides) -> KMaXDeepLab:
  """The model with `jax.ShapeDtypeStruct` leaves (nothing materialised): for parameter counts and shardings."""
  return nnx.eval_shape(lambda: build_model(preset, num_classes, rngs=_abstract_rngs(), **overrides))


def count_params(module: nnx.Module | None) -> int:
  if module is None:
    return 0
  return sum(int(v.size) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def param_breakdown(model: KMaXDeepLab) -> dict[str, int]:
  """Parameter counts per part (the split of docs/kmax.md, section 4)."""
  parts = {
      "backbone": count_params(model.backbone),
      "pixel_decoder": count_params(model.pixel_decoder),
      "transformer_decoder_and_heads": count_params(model.transformer_decoder),
      "aux_semantic_head": count_params(model.semantic_head),
  }
  parts["total_without_aux"] = parts["backbone"] + parts["pixel_decoder"] + parts["transformer_decoder_and_heads"]
  parts["total_with_aux"] = parts["total_without_aux"] + parts["aux_semantic_head"]
  return parts
