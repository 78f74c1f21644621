"""Test helpers: write COCO panoptic JSON + PNG folders, and random GT / prediction pairs with crowd and void."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 7, "name": "dog", "isthing": 1},
    {"id": 20, "name": "sky", "isthing": 0},
    {"id": 21, "name": "road", "isthing": 0},
    {"id": 40, "name": "tree", "isthing": 0},
]


def write_png(path: pathlib.Path, ids: np.ndarray) -> None:
  ids = np.asarray(ids, np.int64)
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
  Image.fromarray(rgb).save(path)


def write_coco(root: pathlib.Path, name: str, images: list[dict], categories=CATEGORIES) -> tuple[str, str]:
  """images: [{"image_id", "file_stem", "ids" [H, W], "segments_info"}]. Returns (json path, folder)."""
  folder = root / name
  folder.mkdir(parents=True, exist_ok=True)
  annotations, image_entries = [], []
  for im in images:
    write_png(folder / f"{im['file_stem']}.png", im["ids"])
    annotations.append({"image_id": im["image_id"], "file_name": f"{im['file_stem']}.png",
                        "segments_info": im["segments_info"]})
    image_entries.append({"id": im["image_id"], "file_name": f"{im['file_stem']}.jpg", "height": im["ids"].shape[0],
                          "width": im["ids"].shape[1]})
  json_path = root / f"{name}.json"
  json_path.write_text(json.dumps({"images": image_entries, "annotations": annotations, "categories": categories}))
  return str(json_path), str(folder)


def _rectangles(rng, ids, count, new_id):
  h, w = ids.shape
  for _ in range(count):
    y0, x0 = rng.integers(0, h), rng.integers(0, w)
    y1, x1 = min(h, y0 + rng.integers(2, h)), min(w, x0 + rng.integers(2, w))
    ids[y0:y1, x0:x1] = new_id()


def random_pair(rng: np.random.Generator, image_id: int, h: int = 32, w: int = 48, categories=CATEGORIES,
                unlisted: bool = True) -> tuple[dict, dict]:
  """A random GT (with crowd, void, sometimes two crowd regions of one category, sometimes unlisted ids) and a
  prediction made by perturbing it (shifts, category swaps, dropped / merged / new segments, void, id 0 used)."""
  cats = [c["id"] for c in categories]
  things = [c["id"] for c in categories if c["isthing"]]
  next_id = iter(rng.permutation(np.arange(1, 5000))[:400].tolist())
  gt = np.zeros((h, w), np.int64)
  stuff_id = {}
  _rectangles(rng, gt, int(rng.integers(3, 12)), lambda: next(next_id))
  present = [int(v) for v in np.unique(gt) if v != 0]
  # Void patches.
  if rng.random() < 0.7:
    _rectangles(rng, gt, int(rng.integers(1, 3)), lambda: 0)
  present = [int(v) for v in np.unique(gt) if v != 0]
  info = []
  crowd_cats = []
  for v in present:
    cid = int(rng.choice(cats))
    crowd = 0
    if cid in things and rng.random() < 0.2:
      crowd = 1
      crowd_cats.append(cid)
    elif cid not in things:
      if cid in stuff_id:  # One segment per stuff class in GT (as COCO): merge into the existing one.
        gt[gt == v] = stuff_id[cid]
        continue
      stuff_id[cid] = v
    info.append({"id": v, "category_id": cid, "iscrowd": crowd})
  for seg in info:
    seg["area"] = int((gt == seg["id"]).sum())
  info = [s for s in info if s["area"] > 0]
  if unlisted and rng.random() < 0.1 and len(info) > 2:
    info.pop(int(rng.integers(0, len(info))))  # Its pixels stay in the PNG: unlisted.
  rng.shuffle(info)
  gt_case = {"image_id": image_id, "file_stem": f"img{image_id:05d}", "ids": gt, "segments_info": info}

  # Prediction: perturb the GT segments.
  pred = np.zeros((h, w), np.int64)
  pred_info = []
  used_zero = rng.random() < 0.15
  ids_for_pred = iter(([0] if used_zero else []) + rng.permutation(np.arange(1, 5000))[:400].tolist())
  for seg in info + [{"id": 0, "category_id": int(rng.choice(cats))}]:
    mask = gt == seg["id"]
    if not mask.any() or rng.random() < 0.1:
      continue
    dy, dx = (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))) if rng.random() < 0.6 else (0, 0)
    mask = np.roll(mask, (dy, dx), axis=(0, 1))
    if rng.random() < 0.2:  # Erode / grow a bit along one axis.
      mask = mask & np.roll(mask, int(rng.integers(1, 4)), axis=int(rng.integers(0, 2)))
    cid = seg["category_id"] if rng.random() < 0.85 else int(rng.choice(cats))
    pid = next(ids_for_pred)
    pred[mask] = pid
    pred_info.append({"id": pid, "category_id": cid, "iscrowd": 0})
  if rng.random() < 0.5:
    extra = np.zeros_like(pred)
    _rectangles(rng, extra, int(rng.integers(1, 3)), lambda: 1)
    pid = next(ids_for_pred)
    pred[extra == 1] = pid
    pred_info.append({"id": pid, "category_id": int(rng.choice(cats)), "iscrowd": 0})
  if rng.random() < 0.3:
    _rectangles(rng, pred, 1, lambda: 0 if not used_zero else 99999)
  present = set(np.unique(pred).tolist())
  pred_info = [s for s in pred_info if s["id"] in present]
  if 99999 in present:  # VOID painted while 0 is a real segment: use an unlisted-free id... make it a segment.
    pred_info.append({"id": 99999, "category_id": int(rng.choice(cats)), "iscrowd": 0})
  if not used_zero or 0 not in {s["id"] for s in pred_info}:
    pred_info = [s for s in pred_info if s["id"] != 0]
  for seg in pred_info:
    seg["area"] = int((pred == seg["id"]).sum())
    seg["score"] = float(np.round(rng.random(), 2))
  pred_case = {"image_id": image_id, "file_stem": f"img{image_id:05d}", "ids": pred, "segments_info": pred_info}
  return gt_case, pred_case
