"""The authors' PyTorch port of kMaX-DeepLab (bytedance/kmax-deeplab): its released checkpoints, whole models.

Key scheme of the port's state dict (read from its module code, checked against models built from its configs:
`tests/weights/port_inventory_*.json` list every key and shape of its R50 COCO, ConvNeXt-B COCO and R50 Cityscapes
models). `backbone.` is a detectron2 ResNet or an official ConvNeXt (`backbones`); then, under `sem_seg_head.`:

| ours | the port |
|---|---|
| `pixel_decoder.in_norms.i` | `pixel_decoder._in_norms.i` (LayerNorm, also for ResNet features) |
| `pixel_decoder.stages.s.blocks.j.{conv1, conv2, conv3, shortcut}` | `._stages.s._blocks.j._{conv1_bn_act, conv2_bn_act, conv3_bn, shortcut}` |
| `...attention.{height, width}.{qkv, bn_qkv, bn_similarity, bn_output, query_rpe, key_rpe, value_rpe}` | `..._attention._{height, width}_axis.{qkv_transform.conv, _batch_norm_qkv, _batch_norm_similarity, _batch_norm_retrieved_output, _{query, key, value}_rpe._embeddings}` |
| `pixel_decoder.fuses.i.{low, high}` | `._resized_fuses.i._conv_bn_{low, high}` |
| `transformer_decoder.layers.i.*` | `predictor._kmax_transformer_layers.i.*` (table `_LAYER`) |
| `transformer_decoder.{cluster_centers, class_proj, mask_proj, predictor}` | `predictor._cluster_centers` (`[C, N]`, transposed), `._{class, mask}_embedding_projection`, `._predcitor` (sic) |
| `semantic_head.*` | `predictor._auxiliary_semantic_predictor.*` (DeepLabv3+ decoder for COCO; 3 convolutions for Cityscapes) |

Both sides compute the same things in the same channel orders (qkv split `[q | k | v]`, heads major; the axial
similarity BatchNorm's 24 channels `[content | query-position | key-position]` x heads; relative position `m - l`),
so every tensor is a layout conversion away from ours. All the port's BatchNorms use epsilon 1e-3, like ours.
Class rows are the dataset's categories with void last; the Cityscapes auxiliary semantic head has no void row.
"""

from __future__ import annotations

from panoptic_jax.data.convert import cityscapes
from panoptic_jax.model import layers
from panoptic_jax.model.kmax_deeplab import KMaXConfig, decoder_strides
from panoptic_jax.weights import backbones
from panoptic_jax.weights import mapping as M

# The port's class rows (void last, after these): COCO panoptic's 133 categories in the order of
# panoptic_coco_categories.json (things, then stuff; detectron2's contiguous ids), Cityscapes' 19 in train-id order.
COCO_PANOPTIC = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat', 'traffic light',
    'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant',
    'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard',
    'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket', 'bottle',
    'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli',
    'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet',
    'tv', 'laptop', 'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink',
    'refrigerator', 'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush', 'banner',
    'blanket', 'bridge', 'cardboard', 'counter', 'curtain', 'door-stuff', 'floor-wood', 'flower', 'fruit', 'gravel',
    'house', 'light', 'mirror-stuff', 'net', 'pillow', 'platform', 'playingfield', 'railroad', 'river', 'road',
    'roof', 'sand', 'sea', 'shelf', 'snow', 'stairs', 'tent', 'towel', 'wall-brick', 'wall-stone', 'wall-tile',
    'wall-wood', 'water-other', 'window-blind', 'window-other', 'tree-merged', 'fence-merged', 'ceiling-merged',
    'sky-other-merged', 'cabinet-merged', 'table-merged', 'floor-other-merged', 'pavement-merged', 'mountain-merged',
    'grass-merged', 'dirt-merged', 'paper-merged', 'food-other-merged', 'building-other-merged', 'rock-merged',
    'wall-other-merged', 'rug-merged',

)
CITYSCAPES = tuple(label.name for label in cityscapes.LABELS)
_LABEL_SPACES = {len(COCO_PANOPTIC): COCO_PANOPTIC, len(CITYSCAPES): CITYSCAPES}

EPS = layers.BN_EPSILON  # The port's BatchNorms: SyncBatchNorm(eps=1e-3).

# Our kMaX block's modules <- the port's kMaX layer's.
_LAYER = {"query_conv1": "_query_conv1_bn_act", "pixel_conv1": "_pixel_conv1_bn_act", "qkv": "_query_qkv_conv_bn",
          "pixel_v": "_pixel_v_conv_bn", "query_conv3": "_query_conv3_bn", "ffn1": "_query_ffn_conv1_bn_act",
          "ffn2": "_query_ffn_conv2_bn", "kmeans_conv3": "_kmeans_query_conv3_bn"}
_LAYER_NORMS = {"bn_similarity": "_query_self_attention._batch_norm_similarity",
                "bn_retrieved": "_query_self_attention._batch_norm_retrieved_value",
                "kmeans_bn": "_kmeans_query_batch_norm_retrieved_value"}


def _conv_bn(ours: str, theirs: str) -> list[M.Entry]:
  return M.conv_bn(ours, f"{theirs}.conv", f"{theirs}.norm", EPS)


def _predictor(ours: str, theirs: str) -> list[M.Entry]:
  return [*_conv_bn(f"{ours}.pixel_dw", f"{theirs}._pixel_space_head_conv0bnact"),
          *_conv_bn(f"{ours}.pixel_hidden", f"{theirs}._pixel_space_head_conv1bnact"),
          *_conv_bn(f"{ours}.pixel_embed", f"{theirs}._pixel_space_head_last_convbn"),
          M.tensor(f"{ours}.pixel_embed.conv.bias", f"{theirs}._pixel_space_head_last_convbn.conv.bias"),
          *_conv_bn(f"{ours}.mask_head", f"{theirs}._transformer_mask_head"),
          *M.linear(f"{ours}.class_head", f"{theirs}._transformer_class_head.conv", classes=True),
          *M.batch_norm(f"{ours}.mask_norm", f"{theirs}._pixel_space_mask_batch_norm", EPS)]


def _axial(ours: str, theirs: str) -> list[M.Entry]:
  return [M.kernel(f"{ours}.qkv.kernel", f"{theirs}.qkv_transform.conv.weight"),
          *M.batch_norm(f"{ours}.bn_qkv", f"{theirs}._batch_norm_qkv", EPS),
          *M.batch_norm(f"{ours}.bn_similarity", f"{theirs}._batch_norm_similarity", EPS),
          *M.batch_norm(f"{ours}.bn_output", f"{theirs}._batch_norm_retrieved_output", EPS),
          *(M.tensor(f"{ours}.{kind}_rpe", f"{theirs}._{kind}_rpe._embeddings.weight")
            for kind in ("query", "key", "value"))]


def _pixel_decoder(arch: KMaXConfig, ours: str, theirs: str, in_channels: dict[int, int]) -> list[M.Entry]:
  entries = []
  strides = decoder_strides(arch)
  previous = None
  for s, (width, blocks, kind) in enumerate(zip(arch.pixel_decoder_widths, arch.pixel_decoder_blocks,
                                                arch.pixel_decoder_types)):
    entries += M.layer_norm(f"{ours}.in_norms.{s}", f"{theirs}._in_norms.{s}")
    filters = (2 * width, width, 4 * width) if kind == "axial" else (width, width, 4 * width)
    block_in = in_channels[strides[s]] if s == 0 else width
    if s > 0:
      fuse, their_fuse = f"{ours}.fuses.{s - 1}", f"{theirs}._resized_fuses.{s - 1}"
      if previous != width:
        entries += _conv_bn(f"{fuse}.low", f"{their_fuse}._conv_bn_low")
      if in_channels[strides[s]] != width:
        entries += _conv_bn(f"{fuse}.high", f"{their_fuse}._conv_bn_high")
    for j in range(blocks):
      block, their_block = f"{ours}.stages.{s}.blocks.{j}", f"{theirs}._stages.{s}._blocks.{j}"
      entries += _conv_bn(f"{block}.conv1", f"{their_block}._conv1_bn_act")
      if kind == "axial":
        for axis in ("height", "width"):
          entries += _axial(f"{block}.attention.{axis}", f"{their_block}._attention._{axis}_axis")
      else:
        entries += _conv_bn(f"{block}.conv2", f"{their_block}._conv2_bn_act")
      entries += _conv_bn(f"{block}.conv3", f"{their_block}._conv3_bn")
      if block_in != filters[-1]:
        entries += _conv_bn(f"{block}.shortcut", f"{their_block}._shortcut")
      block_in = filters[-1]
    previous = filters[-1]
  return entries


def _semantic_head(arch: KMaXConfig, ours: str, theirs: str) -> list[M.Entry]:
  if arch.semantic_head == "simple":
    return [*_conv_bn(f"{ours}.dw", f"{theirs}.0"), *_conv_bn(f"{ours}.pw", f"{theirs}.1"),
            M.Entry(f"{ours}.classifier.kernel", (f"{theirs}.2.conv.weight",), M.torch_kernel, kernel=True,
                    classes=True, void=False),
            M.Entry(f"{ours}.classifier.bias", (f"{theirs}.2.conv.bias",), classes=True, void=False)]
  if arch.semantic_head != "decoder":
    return []
  aspp = f"{theirs}._aspp"
  entries = [*_conv_bn(f"{ours}.aspp.conv0", f"{aspp}._aspp_conv0"),
             *(e for i in range(len(arch.aspp_rates)) for e in _conv_bn(f"{ours}.aspp.atrous.{i}",
                                                                         f"{aspp}._aspp_conv{i + 1}")),
             *_conv_bn(f"{ours}.aspp.pool", f"{aspp}._aspp_pool"),
             *_conv_bn(f"{ours}.aspp.proj", f"{aspp}._proj_conv_bn_act")]
  for i, stride in enumerate(arch.semantic_low_strides):
    entries += [*_conv_bn(f"{ours}.proj.{i}", f"{theirs}._low_level_projection_os{stride}"),
                *_conv_bn(f"{ours}.fuse_dw.{i}", f"{theirs}._low_level_fusion_os{stride}_conv0_bn_act"),
                *_conv_bn(f"{ours}.fuse_pw.{i}", f"{theirs}._low_level_fusion_os{stride}_conv1_bn_act")]
  return [*entries, *_conv_bn(f"{ours}.head_dw", f"{theirs}.conv_block_0"),
          *_conv_bn(f"{ours}.head_pw", f"{theirs}.conv_block_1"),
          *M.linear(f"{ours}.classifier", f"{theirs}.final_conv.conv", classes=True)]


def entries(arch: KMaXConfig, num_classes: int) -> list[M.Entry]:
  """Every variable of a kMaX model of `arch` <- the port's tensors."""
  del num_classes  # Class rows are matched by name (`importer`).
  if arch.backbone == "resnet":
    out = backbones.resnet(arch, "backbone.", detectron2=True, eps=EPS)
    widths = [arch.backbone_widths[0]] + [w * (4 if arch.resnet_bottleneck else 1) for w in arch.backbone_widths]
  else:
    out = backbones.convnext(arch, "backbone.", timm=False)
    widths = [0, *arch.backbone_widths]
  in_channels = {2 ** i: w for i, w in enumerate(widths, start=1)}
  out += _pixel_decoder(arch, "pixel_decoder", "sem_seg_head.pixel_decoder", in_channels)
  theirs = "sem_seg_head.predictor"
  for i in range(sum(arch.decoder_blocks)):
    ours, layer = f"transformer_decoder.layers.{i}", f"{theirs}._kmax_transformer_layers.{i}"
    for mine, their in _LAYER.items():
      out += _conv_bn(f"{ours}.{mine}", f"{layer}.{their}")
    for mine, their in _LAYER_NORMS.items():
      out += M.batch_norm(f"{ours}.{mine}", f"{layer}.{their}", EPS)
    out += _predictor(f"{ours}.predictor", f"{layer}._predcitor")
  out += [M.Entry("transformer_decoder.cluster_centers", (f"{theirs}._cluster_centers.weight",), lambda w: w.T),
          *_conv_bn("transformer_decoder.class_proj", f"{theirs}._class_embedding_projection"),
          *_conv_bn("transformer_decoder.mask_proj", f"{theirs}._mask_embedding_projection"),
          *_predictor("transformer_decoder.predictor", f"{theirs}._predcitor")]
  return out + _semantic_head(arch, "semantic_head", f"{theirs}._auxiliary_semantic_predictor")


SCHEMES = (
    M.Scheme("kmax_port", "the kMaX-DeepLab PyTorch port (bytedance/kmax-deeplab), whole model",
             entries, marker=r"sem_seg_head\.predictor\._cluster_centers\.weight", unused=(M.BN_COUNTERS,),
             class_names=_LABEL_SPACES.get),
)
