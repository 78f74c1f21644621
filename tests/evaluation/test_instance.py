"""AP^Th_pan against pycocotools COCOeval(iouType='segm') on random panoptic cases and the fixtures' numbers."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from panoptic_jax.evaluation import coco_format, instance
from panoptic_jax.evaluation.segment_stats import SegmentHistogram

from . import coco_cases


def _pycocotools_ap(images, is_thing):
  """images: [(gt, crowd, pred, scores)] canonical maps (label divisor 1000) -> COCOeval stats (12)."""
  gt_anns, dt_anns, image_entries = [], [], []
  for image_id, (gt, crowd, pred, scores) in enumerate(images, start=1):
    h, w = gt.shape
    image_entries.append({"id": image_id, "height": h, "width": w})
    for v in np.unique(gt[(gt >= 0) & (crowd == -1)]):
      if is_thing[v // 1000]:
        m = (gt == v) & (crowd == -1)
        gt_anns.append((image_id, int(v // 1000), m, 0))
    for c in np.unique(crowd[crowd >= 0]):
      if is_thing[c]:
        gt_anns.append((image_id, int(c), crowd == c, 1))
    for v in np.unique(pred[pred >= 0]):
      if is_thing[v // 1000]:
        dt_anns.append((image_id, int(v // 1000), pred == v, scores[int(v)]))
  dataset = {"images": image_entries, "categories": [{"id": k} for k in range(len(is_thing))], "annotations": []}
  for i, (image_id, c, m, crowd) in enumerate(gt_anns, start=1):
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    dataset["annotations"].append({"id": i, "image_id": image_id, "category_id": c, "segmentation": rle,
                                   "area": float(m.sum()), "iscrowd": crowd, "bbox": [0, 0, 1, 1]})
  results = []
  for image_id, c, m, score in dt_anns:
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    results.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": score})
  with contextlib.redirect_stdout(io.StringIO()):
    coco_gt = COCO()
    coco_gt.dataset = dataset
    coco_gt.createIndex()
    if not results:
      return None
    coco_dt = coco_gt.loadRes(results)
    ev = COCOeval(coco_gt, coco_dt, iouType="segm")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


def _ours(images, is_thing):
  acc = instance.InstanceAPAccumulator()
  for gt, crowd, pred, scores in images:
    acc.add_image(instance.thing_instances(SegmentHistogram.of_maps(gt, crowd, pred), scores, is_thing, 1000))
  return np.array([acc.result()[k] for k in instance.STAT_NAMES])


def _canonical_random_images(rng, count, tmp_path, h=40, w=56):
  gts, preds = zip(*(coco_cases.random_pair(rng, i + 1, h, w, unlisted=False) for i in range(count)))
  gt_json, gt_folder = coco_cases.write_coco(tmp_path, "gt", list(gts))
  pred_json, pred_folder = coco_cases.write_coco(tmp_path, "pred", list(preds))
  gt_side = coco_format.CocoPanoptic.open(gt_json, gt_folder)
  pred_side = coco_format.CocoPanoptic.open(pred_json, pred_folder)
  index = {c["id"]: k for k, c in enumerate(coco_cases.CATEGORIES)}
  images = []
  for key in gt_side.annotations:
    g = gt_side.load(key, index, 1000, True)
    p = pred_side.load(key, index, 1000, False)
    crowd = g.crowd if g.crowd is not None else np.full_like(g.panoptic, -1)  # None: no crowd pixel.
    images.append((g.panoptic, crowd, p.panoptic, p.scores))
  return images


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_matches_pycocotools_on_random_cases(seed, tmp_path):
  rng = np.random.default_rng(seed)
  images = _canonical_random_images(rng, 40, tmp_path)
  if seed == 2:  # Ties: every score equal; order then follows images, then segments (as pycocotools).
    images = [(g, c, p, {v: 1.0 for v in s}) for g, c, p, s in images]
  is_thing = np.array([c["isthing"] for c in coco_cases.CATEGORIES], bool)
  np.testing.assert_allclose(_ours(images, is_thing), _pycocotools_ap(images, is_thing), atol=1e-12)


def test_ap_large_objects_and_many_detections():
  rng = np.random.default_rng(5)
  images = []
  for _ in range(3):
    gt = np.full((120, 160), -1, np.int32)
    pred = np.full((120, 160), -1, np.int32)
    for k in range(1, 9):  # Big and small objects of category 0.
      y, x, s = rng.integers(0, 100), rng.integers(0, 140), rng.integers(3, 60)
      gt[y:y + s, x:x + s] = k
      pred[max(0, y - 2):y + s, x:x + s + 3] = k
    for k in range(9, 130):  # Many tiny false detections (> maxDets 100).
      y, x = rng.integers(0, 118), rng.integers(0, 158)
      pred[y:y + 2, x:x + 2] = k
    present = np.unique(pred[pred >= 0])
    images.append((gt, np.full_like(gt, -1), pred, {int(v): float(rng.random()) for v in present}))
  is_thing = np.array([True])
  np.testing.assert_allclose(_ours(images, is_thing), _pycocotools_ap(images, is_thing), atol=1e-12)


AP_CASES = [
    ("tfmodels_deeplab_coco", "tfmodels_deeplab_eval_testdata", "coco_gt", "coco_pred"),
    ("panopticapi_sample_gt_vs_gt", "panopticapi_sample", "panoptic_examples", "panoptic_examples"),
    ("panopticapi_sample_pred_edits", "panopticapi_sample", "panoptic_examples", "derived_predictions/pred_edits"),
    ("panopticapi_sample_pred_crowd", "panopticapi_sample", "panoptic_examples", "derived_predictions/pred_crowd"),
]


@pytest.mark.parametrize("case,folder,gt,pred", AP_CASES, ids=[c[0] for c in AP_CASES])
def test_ap_fixture_with_scores_one(fixtures, case, folder, gt, pred):
  root = fixtures / folder
  expected = json.loads((root / "expected_results.json").read_text())["cases"][case]
  gt_side = coco_format.CocoPanoptic.open(root / f"{gt}.json", root / gt)
  pred_side = coco_format.CocoPanoptic.open(root / f"{pred}.json", root / pred)
  index = {c.id: k for k, c in enumerate(gt_side.categories)}
  is_thing = np.array([c.isthing for c in gt_side.categories])
  acc = instance.InstanceAPAccumulator()
  for key in sorted(gt_side.annotations, key=lambda k: gt_side.image_ids[k]):
    g = gt_side.load(key, index, 1000, True)
    p = pred_side.load(key, index, 1000, False)
    scores = {int(v): 1.0 for v in np.unique(p.panoptic[p.panoptic >= 0])}
    histogram = SegmentHistogram.of_maps(g.panoptic, g.crowd, p.panoptic)
    acc.add_image(instance.thing_instances(histogram, scores, is_thing, 1000))
  ours = acc.result()
  for name, value in expected["mask_AP_things_pycocotools_segm_score1"].items():
    assert ours[name] == pytest.approx(value, abs=1e-12), name
