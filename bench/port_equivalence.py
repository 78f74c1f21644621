"""The authors' PyTorch port of kMaX-DeepLab against this model with the port's weights imported: same images, every
stage compared.

    python bench/port_equivalence.py PORT_RUN [PORT_RUN ...]

A PORT_RUN folder is what a throwaway build of the port (bytedance/kmax-deeplab, never part of this project; see
BENCHMARKS.md for how it was made) wrote for one model and size: `state_dict.pth` (`torch.save(model.state_dict())`
of the port's model with random weights, eval mode), `images.npy` (uint8 `[B, S, S, 3]`, RGB), `outputs.npz` (the
port's tensors, NCHW) and `meta.json` (config, size, the panoptic segments). The state dict is imported with
`panoptic_jax.weights` (`kmax_port` scheme; `PORT_MODELS` says which preset and label space each of the port's
configs is), the model runs in eval mode on the same images, and the table lists, per tensor, max |ours - port| next
to max |port|:

- the backbone features (strides 4..32) and the pixel decoder's outputs (and, when the run folder holds
  `pixel_decoder_os16_blocks.npz` with each block's input and output, the stride-16 stage's axial blocks one by one);
- per kMaX layer and for the final predictor: class logits, mask logits (at the layer's own stride) and pixel
  embeddings;
- the panoptic maps: the port's `panoptic_seg` against our `postprocess` (the port's thresholds: COCO's, no area
  limits) of the port's own final logits and of ours: equal up to segment ids, or how many pixels differ, and PQ
  between the two.

Each stage runs on the port's inputs to that stage ("stage-wise": its own difference) and, as one chain from the
images ("chained"), on our previous stage's outputs. With random weights the network is chaotic (attention over
logits of magnitude 10-100 amplifies a 1e-6 rounding difference stage after stage), so the chained column measures
that amplification, not the import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from panoptic_jax import cli  # noqa: E402
from panoptic_jax.data.convert import cityscapes  # noqa: E402
from panoptic_jax.inference import postprocess  # noqa: E402
from panoptic_jax.model import kmax_deeplab, layers  # noqa: E402
from panoptic_jax.weights import importer, kmax_port, readers  # noqa: E402

LABEL_DIVISOR = 1000


@dataclasses.dataclass(frozen=True)
class PortModel:
  """What one of the port's configs is here: our preset, its class names and things, its merge thresholds."""
  preset: str
  class_names: tuple[str, ...]
  is_thing: tuple[bool, ...]
  postprocess: str


_COCO_THINGS = tuple(i < 80 for i in range(len(kmax_port.COCO_PANOPTIC)))
_CITYSCAPES_THINGS = tuple(label.is_thing for label in cityscapes.LABELS)
# The port's config (dataset folder / file name) -> ours.
PORT_MODELS = {
    "coco/kmax_r50.yaml": PortModel("kmax_r50_coco", kmax_port.COCO_PANOPTIC, _COCO_THINGS, "coco"),
    "coco/kmax_convnext_base.yaml": PortModel("kmax_convnext_b_coco", kmax_port.COCO_PANOPTIC, _COCO_THINGS, "coco"),
    "cityscapes/kmax_r50.yaml": PortModel("kmax_r50_cityscapes_port", kmax_port.CITYSCAPES, _CITYSCAPES_THINGS,
                                          "cityscapes"),
}


def port_model(config: str) -> PortModel:
  parts = pathlib.Path(config).parts
  return PORT_MODELS[f"{parts[-3]}/{parts[-1]}"]


def _nhwc(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (0, 2, 3, 1))


def forward_stages(model: kmax_deeplab.KMaXDeepLab, images: jax.Array) -> dict[str, jax.Array]:
  """The model's forward pass with every stage kept (the steps of `KMaXDeepLab.__call__` and the transformer
  decoder, spelt out so that each kMaX layer's predictions are seen at their own stride)."""
  out = {}
  feats = model.backbone(images.astype(jnp.float32) / 127.5 - 1.0)
  for stride, name in ((4, "res2"), (8, "res3"), (16, "res4"), (32, "res5")):
    out[f"backbone_{name}"] = feats[stride]
  if model.pixel_decoder.pooled:
    out["backbone_stem"] = layers.max_pool_3x3(feats[2])
  panoptic, multi_scale = model.pixel_decoder(feats)
  out.update(pixel_decoder_out=panoptic, pixel_decoder_os32=multi_scale[0], pixel_decoder_os16=multi_scale[1],
             pixel_decoder_os8=multi_scale[2])
  decoder = model.transformer_decoder
  centres = jnp.broadcast_to(decoder.cluster_centers[...][None], (images.shape[0],) + decoder.cluster_centers.shape)
  index = 0
  for stage, blocks in enumerate(decoder.blocks):
    for _ in range(blocks):
      centres, pred = decoder.layers[index](multi_scale[stage], centres)
      out.update({f"layer{index}_{k}": v for k, v in pred.items()})
      index += 1
  final = decoder.predictor(decoder.mask_proj(centres), decoder.class_proj(centres), panoptic)
  out.update({f"final_{k}": v for k, v in final.items()})
  return out


def _ours(port: np.ndarray) -> jax.Array:
  """A port tensor in our layout: NCHW -> NHWC; queries `[B, C, N]` -> `[B, N, C]`."""
  return jnp.asarray(np.transpose(port, (0, 2, 3, 1)) if port.ndim == 4 else np.transpose(port, (0, 2, 1)))


def forward_stagewise(model: kmax_deeplab.KMaXDeepLab, port: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Each stage of the model on the port's inputs to that stage (its previous stage's outputs): a stage's difference
  is then its own, not the accumulated rounding of the stages before it."""
  out = {}
  decoder = model.pixel_decoder
  feats = {stride: _ours(port[f"backbone_{name}"])
           for stride, name in ((4, "res2"), (8, "res3"), (16, "res4"), (32, "res5"))}
  if decoder.pooled:  # The port's "stem" feature is the stem after max-pooling: what our decoder pools it into.
    feats[2] = _ours(port["backbone_stem"])
  normed = [norm(feats[s]) for norm, s in zip(decoder.in_norms, decoder.strides)]
  # The port keeps the stride 32, 16 and 8 stage outputs and the last one; a stage whose input the port did not keep
  # (Cityscapes' fifth) runs on our previous stage's output.
  stage_names = ("pixel_decoder_os32", "pixel_decoder_os16", "pixel_decoder_os8") + tuple(
      f"pixel_decoder_stage{s}" for s in range(3, len(decoder.strides) - 1)) + ("pixel_decoder_out",)
  previous = None
  for s, name in enumerate(stage_names):
    if s > 0:
      previous = _ours(port[stage_names[s - 1]]) if stage_names[s - 1] in port else previous
    x = normed[0] if s == 0 else decoder.fuses[s - 1](previous, normed[s])
    out[name] = previous = decoder.stages[s](x)
  transformer = model.transformer_decoder
  index = 0
  for stage, blocks in enumerate(transformer.blocks):
    for _ in range(blocks):
      before = _ours(port["query_init"] if index == 0 else port[f"layer{index - 1}_query_out"])
      out[f"layer{index}_query_out"], pred = transformer.layers[index](_ours(port[stage_names[stage]]), before)
      out.update({f"layer{index}_{k}": v for k, v in pred.items()})
      index += 1
  centres = _ours(port[f"layer{index - 1}_query_out"])
  final = transformer.predictor(transformer.mask_proj(centres), transformer.class_proj(centres),
                                _ours(port["pixel_decoder_out"]))
  out.update({f"final_{k}": v for k, v in final.items()})
  return out


def _port_layout(name: str, port: np.ndarray) -> np.ndarray:
  """The port's tensor in our layout, as numpy."""
  if name.endswith("mask_logits"):
    return np.transpose(port, (0, 2, 3, 1))
  return np.asarray(_ours(port)) if port.ndim in (3, 4) and not name.endswith("class_logits") else port


def _canonical(panoptic: np.ndarray, segments: list[dict]) -> np.ndarray:
  """The port's id map + segments_info -> `category * LABEL_DIVISOR + instance` (things numbered 1.. per class in
  id order, stuff 0), void -1: the form of our maps."""
  out = np.full(panoptic.shape, postprocess.VOID, np.int64)
  counts: dict[int, int] = {}
  for seg in sorted(segments, key=lambda s: s["id"]):
    instance = 0
    if seg["isthing"]:
      counts[seg["category_id"]] = instance = counts.get(seg["category_id"], 0) + 1
    out[panoptic == seg["id"]] = seg["category_id"] * LABEL_DIVISOR + instance
  return out


def _same_up_to_ids(a: np.ndarray, b: np.ndarray) -> tuple[bool, int]:
  """Whether two maps are one relabelling apart (categories kept), and the number of differing pixels under the
  best relabelling (0 when equal)."""
  pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
  same = (len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
          and np.all(pairs[0] // LABEL_DIVISOR == pairs[1] // LABEL_DIVISOR))
  return bool(same), 0 if same else int(np.sum(a // LABEL_DIVISOR != b // LABEL_DIVISOR))


def _pq(a: np.ndarray, b: np.ndarray) -> float:
  """PQ of map `a` against map `b` as ground truth (IoU > 0.5 matching, void ignored), all segments pooled."""
  tp = fp = fn = 0
  iou_sum = 0.0
  ids_a, ids_b = np.unique(a[a >= 0]), np.unique(b[b >= 0])
  matched_a = set()
  for sb in ids_b:
    mb = b == sb
    for sa in np.unique(a[mb]):
      if sa < 0 or sa // LABEL_DIVISOR != sb // LABEL_DIVISOR:
        continue
      ma = a == sa
      iou = np.sum(ma & mb) / np.sum(ma | mb)
      if iou > 0.5:
        tp, iou_sum = tp + 1, iou_sum + iou
        matched_a.add(sa)
        break
    else:
      fn += 1
  fp = len([s for s in ids_a if s not in matched_a])
  return iou_sum / max(tp + 0.5 * fp + 0.5 * fn, 1e-9)


def compare(run: pathlib.Path) -> list[tuple[str, float, float, float]]:
  meta = json.loads((run / "meta.json").read_text())
  spec = port_model(meta["config"])
  preset = spec.preset
  images = np.load(run / "images.npy")
  port = np.load(run / "outputs.npz")
  t0 = time.perf_counter()
  tensors = readers.read_tensors(str(run / "state_dict.pth"))
  read_s = time.perf_counter() - t0
  model = kmax_deeplab.build_model(preset, len(spec.class_names), rngs=nnx.Rngs(0))
  model.eval()
  state = importer.model_variables(model)
  values, report = importer.plan(tensors, importer.variables(state), kmax_deeplab.get_config(preset),
                                 len(spec.class_names), source=str(run / "state_dict.pth"),
                                 class_names=spec.class_names)
  state = importer.assign(state, values)
  nnx.update(model, state["params"], state["model_state"])
  print(f"{run.name}: {preset} at {meta['size']}, {images.shape[0]} images; read {len(tensors)} tensors in "
        f"{read_s:.1f} s; {report.parameters_loaded:,} of {report.parameters_total:,} parameters imported")
  chained = jax.jit(lambda x: forward_stages(model, x))(jnp.asarray(images))
  port_inputs = {k: port[k] for k in port.files if k.startswith(("backbone", "pixel", "layer", "query"))}
  stagewise = jax.jit(lambda p: forward_stagewise(model, p))(port_inputs)
  stagewise.update({k: v for k, v in chained.items() if k.startswith("backbone")})
  rows = []
  for name in sorted(stagewise, key=lambda n: (not n.startswith(("backbone", "pixel")), n)):
    if name not in port.files:
      continue
    theirs = _port_layout(name, port[name])
    rows.append((name, float(np.max(np.abs(np.asarray(stagewise[name]) - theirs))),
                 float(np.max(np.abs(np.asarray(chained[name]) - theirs))) if name in chained else float("nan"),
                 float(np.max(np.abs(theirs)))))
  merge = dataclasses.replace(postprocess.get_preset(spec.postprocess), thing_area_limit=0, stuff_area_limit=0)
  is_thing = jnp.asarray(spec.is_thing)
  size = images.shape[1:3]
  blocks_file = run / "pixel_decoder_os16_blocks.npz"
  if blocks_file.exists():  # Optional: the stride-16 stage's blocks one by one, on the port's input to each.
    blocks = np.load(blocks_file)
    for j, block in enumerate(model.pixel_decoder.stages[1].blocks):
      theirs = np.transpose(blocks[f"block{j}_out"], (0, 2, 3, 1))
      mine = np.asarray(jax.jit(block)(_ours(blocks[f"block{j}_in"])))
      rows.append((f"pixel_decoder_os16_block{j}", float(np.max(np.abs(mine - theirs))), float("nan"),
                   float(np.max(np.abs(theirs)))))

  def maps(mask_logits, class_logits) -> np.ndarray:
    out = postprocess.postprocess(jnp.asarray(mask_logits), jnp.asarray(class_logits), size, is_thing, merge,
                                  LABEL_DIVISOR)["panoptic"]
    return np.asarray(out)

  from_ours = maps(stagewise["final_mask_logits"], stagewise["final_class_logits"])
  from_port = maps(np.transpose(port["final_mask_logits"], (0, 2, 3, 1)), port["final_class_logits"])
  for b in range(images.shape[0]):
    theirs_map = _canonical(port["panoptic_seg"][b], meta["segments_info"][b])
    for what, ours_maps in (("the port's final logits", from_port), ("our final logits", from_ours)):
      same, differing = _same_up_to_ids(ours_maps[b], theirs_map)
      print(f"  image {b}, our post-processing of {what}: panoptic map {'equal to' if same else 'differs from'} "
            f"the port's ({len(meta['segments_info'][b])} segments; {differing} of {theirs_map.size} pixels of "
            f"another category); PQ = {_pq(ours_maps[b], theirs_map):.4f}")
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("runs", nargs="+", type=pathlib.Path)
  args = parser.parse_args(argv)
  for run in args.runs:
    rows = compare(run)
    print(f"  {'tensor':<28} {'stage-wise':>11} {'chained':>11} {'max |port|':>11}")
    for name, stage, chain, scale in rows:
      print(f"  {name:<28} {stage:>11.2e} {chain:>11.2e} {scale:>11.3g}")
    worst = max(stage / max(scale, 1.0) for _, stage, _, scale in rows)
    print(f"  largest stage-wise difference relative to max(1, max |port|): {worst:.2e}\n")
  return 0


if __name__ == "__main__":
  cli.run(main)
