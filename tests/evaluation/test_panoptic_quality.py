"""PQ against panopticapi's golden numbers (shared fixtures), hotcoco on random pairs, edge cases, sharding."""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from panoptic_jax.evaluation import evaluator as evaluator_lib
from panoptic_jax.evaluation.panoptic_quality import HOST_ALIGNMENT, aligned_full, panoptic_stats
from panoptic_jax.evaluation.segment_stats import (NO_CROWD, UNLISTED, MixedBlockOverflowError,
                                                  PanopticQualityAccumulator, SegmentOverflowError)

from . import coco_cases

FIXTURE_CASES = [
    # (case, folder, gt json, gt folder, pred json, pred folder)
    ("panopticapi_sample_gt_vs_gt", "panopticapi_sample", "panoptic_examples.json", "panoptic_examples",
     "panoptic_examples.json", "panoptic_examples"),
    ("panopticapi_sample_pred_edits", "panopticapi_sample", "panoptic_examples.json", "panoptic_examples",
     "derived_predictions/pred_edits.json", "derived_predictions/pred_edits"),
    ("panopticapi_sample_pred_crowd", "panopticapi_sample", "panoptic_examples.json", "panoptic_examples",
     "derived_predictions/pred_crowd.json", "derived_predictions/pred_crowd"),
    ("tfmodels_deeplab_coco", "tfmodels_deeplab_eval_testdata", "coco_gt.json", "coco_gt", "coco_pred.json",
     "coco_pred"),
]


def _evaluate_coco(gt_json, gt_folder, pred_json, pred_folder, **kwargs):
  gt = evaluator_lib.open_coco_side(str(gt_json), str(gt_folder))
  pred = evaluator_lib.open_coco_side(str(pred_json), str(pred_folder), reference=gt.coco)
  return evaluator_lib.evaluate_sides(gt, pred, progress=False, **kwargs)


@pytest.mark.parametrize("case,folder,gt_json,gt_folder,pred_json,pred_folder", FIXTURE_CASES,
                         ids=[c[0] for c in FIXTURE_CASES])
def test_fixtures_match_panopticapi(fixtures, case, folder, gt_json, gt_folder, pred_json, pred_folder):
  root = fixtures / folder
  expected = json.loads((root / "expected_results.json").read_text())["cases"][case]
  result = _evaluate_coco(root / gt_json, root / gt_folder, root / pred_json, root / pred_folder)
  pq, reference = result["panoptic"], expected["panopticapi"]
  for group in ("All", "Things", "Stuff"):
    assert pq[group]["n"] == reference[group]["n"]
    for metric in ("pq", "sq", "rq"):
      assert pq[group][metric] == pytest.approx(reference[group][metric], abs=1e-9), (group, metric)
  counted = {name for name, e in pq["per_category"].items() if e["counted"]}
  assert counted == {v["name"] for v in reference["per_category"].values()}
  for v in reference["per_category"].values():
    ours = pq["per_category"][v["name"]]
    assert (ours["tp"], ours["fp"], ours["fn"]) == (v["tp"], v["fp"], v["fn"]), v["name"]
    assert ours["iou_sum"] == pytest.approx(v["iou_sum"], abs=1e-9)
    assert ours["isthing"] == bool(v["isthing"])
  # mIoU, both conventions, and per-class IoU.
  sem, sem_ref = result["semantic"], expected["semantic"]
  assert sem["mIoU_classes_with_gt"] == pytest.approx(sem_ref["mIoU_classes_with_gt (detectron2)"], abs=1e-12)
  assert sem["mIoU_classes_with_union"] == pytest.approx(
      sem_ref["mIoU_classes_with_union (keras/mmseg/cityscapes)"], abs=1e-12)
  names = {cid: v["name"] for cid, v in reference["per_category"].items()}
  for cid, iou in sem_ref["per_class_iou"].items():
    assert sem["per_class"][names[cid]]["iou"] == pytest.approx(iou, abs=1e-12)
  assert result["instance"]["computed"] is False and "AP not computed" in result["instance"]["reason"]


def _cityscapes_side(fixtures, tmp_path):
  """The DeepLab2 Cityscapes dummy GT with a categories list (its JSON has none): 19 train ids."""
  root = fixtures / "deeplab2_cityscapes_dummy" / "gtFine"
  data = json.loads((root / "cityscapes_panoptic_dummy_trainId.json").read_text())
  names = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
           "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]
  data["annotations"][0]["image_id"] = 1  # hotcoco (the cross-check below) wants integer image ids.
  data["categories"] = [{"id": k, "name": n, "isthing": int(k >= 11)} for k, n in enumerate(names)]
  path = tmp_path / "cityscapes_gt.json"
  path.write_text(json.dumps(data))
  return path, root / "cityscapes_panoptic_dummy_trainId", data


def test_cityscapes_dummy_gt_vs_itself_and_crowd(fixtures, tmp_path):
  gt_json, gt_folder, data = _cityscapes_side(fixtures, tmp_path)
  result = _evaluate_coco(gt_json, gt_folder, gt_json, gt_folder)
  pq = result["panoptic"]
  assert pq["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 5}
  car = pq["per_category"]["car"]
  assert (car["tp"], car["fp"], car["fn"]) == (5, 0, 0)  # The crowd region (predicted as a car) is forgiven.

  # Cross-check a perturbed prediction against hotcoco.
  from PIL import Image
  ids = np.asarray(Image.open(gt_folder / data["annotations"][0]["file_name"]).convert("RGB"), np.int64)
  ids = ids[..., 0] + 256 * ids[..., 1] + 65536 * ids[..., 2]
  pred = np.roll(ids, 7, axis=1)
  pred[:100] = 0
  info = [{"id": s["id"], "category_id": s["category_id"], "iscrowd": 0} for s in data["annotations"][0]["segments_info"]
          if (pred == s["id"]).any()]
  pred_case = {"image_id": data["annotations"][0]["image_id"], "file_stem": "dummy_000000_000000_gtFine_panoptic",
               "ids": pred, "segments_info": info}
  pred_json, pred_folder = coco_cases.write_coco(tmp_path, "pred", [pred_case], json.loads(gt_json.read_text())[
      "categories"])
  ours = _evaluate_coco(gt_json, gt_folder, pred_json, pred_folder)["panoptic"]
  from hotcoco.panoptic import pq_compute
  with contextlib.redirect_stdout(io.StringIO()):
    reference = pq_compute(str(gt_json), pred_json, str(gt_folder), pred_folder)
  for group in ("All", "Things", "Stuff"):
    for metric in ("pq", "sq", "rq", "n"):
      assert ours[group][metric] == pytest.approx(reference[group][metric], abs=1e-9)


def _hotcoco_per_class(reference, category_id):
  per_class = reference["per_class"]
  return per_class.get(category_id, per_class.get(str(category_id)))


@pytest.mark.slow
def test_random_pairs_match_hotcoco(tmp_path):
  rng = np.random.default_rng(1234)
  gts, preds = zip(*(coco_cases.random_pair(rng, i + 1) for i in range(240)))
  gt_json, gt_folder = coco_cases.write_coco(tmp_path, "gt", list(gts))
  pred_json, pred_folder = coco_cases.write_coco(tmp_path, "pred", list(preds))
  from hotcoco.panoptic import pq_compute
  with contextlib.redirect_stdout(io.StringIO()):
    reference = pq_compute(gt_json, pred_json, gt_folder, pred_folder)
  gt = evaluator_lib.open_coco_side(gt_json, gt_folder)
  pred = evaluator_lib.open_coco_side(pred_json, pred_folder)
  result = evaluator_lib.evaluate_sides(gt, pred, progress=False, batch_size=16)
  pq = result["panoptic"]
  for group in ("All", "Things", "Stuff"):
    for metric in ("pq", "sq", "rq", "n"):
      assert pq[group][metric] == pytest.approx(reference[group][metric], abs=1e-9), (group, metric)
  for c in coco_cases.CATEGORIES:
    ref, ours = _hotcoco_per_class(reference, c["id"]), pq["per_category"][c["name"]]
    assert (ours["tp"], ours["fp"], ours["fn"]) == (ref["tp"], ref["fp"], ref["fn"]), c["name"]
    assert ours["iou_sum"] == pytest.approx(ref["iou"], abs=1e-9)
  assert result["instance"]["computed"]  # Random predictions carry scores.
  _assert_same_as_the_maps_path(gt, pred, result)

  # Per image as well (a few): catches compensating errors.
  for i in range(0, 240, 40):
    sub = tmp_path / f"one{i}"
    gj, gf = coco_cases.write_coco(sub, "gt", [gts[i]])
    pj, pf = coco_cases.write_coco(sub, "pred", [preds[i]])
    with contextlib.redirect_stdout(io.StringIO()):
      ref = pq_compute(gj, pj, gf, pf)
    ours = _evaluate_coco(gj, gf, pj, pf, batch_size=16)["panoptic"]
    for c in coco_cases.CATEGORIES:
      r, o = _hotcoco_per_class(ref, c["id"]), ours["per_category"][c["name"]]
      assert (o["tp"], o["fp"], o["fn"]) == (r["tp"], r["fp"], r["fn"]), (i, c["name"])


def _assert_same_as_the_maps_path(gt, pred, result):
  """COCO files are counted through segment histograms on the host; the same images given to the Evaluator as
  label maps (the jitted metric, as in a training run's evaluation) give the same PQ, mIoU and AP."""
  index = {cid: k for k, cid in enumerate(gt.category_ids)}
  evaluator = evaluator_lib.Evaluator(gt.categories, gt.is_thing, gt.label_divisor)
  for key in gt.names:
    g = gt.coco.load(key, index, gt.label_divisor, is_gt=True)
    p = pred.coco.load(key, index, gt.label_divisor, is_gt=False)
    evaluator.add(g.panoptic, p.panoptic, g.crowd, scores=p.scores, name=key, extra_fn=g.missing_fn)
  maps = evaluator.result()
  for name, ours in result["panoptic"]["per_category"].items():
    theirs = maps["panoptic"]["per_category"][name]
    assert {k: v for k, v in ours.items() if k not in ("iou_sum", "pq", "sq", "rq")} == {
        k: v for k, v in theirs.items() if k not in ("iou_sum", "pq", "sq", "rq")}, name
    assert ours["iou_sum"] == pytest.approx(theirs["iou_sum"], abs=1e-12), name
  assert result["semantic"] == maps["semantic"]
  assert result["instance"] == maps["instance"]


def _stats(gt, pred, crowd=None, c=3, div=100, s=16):
  """Pixel-by-pixel stats, checked equal to the block path with room for every block."""
  args = (np.asarray(gt, np.int32)[None], np.asarray(pred, np.int32)[None],
          None if crowd is None else np.asarray(crowd, np.int32)[None])
  by_pixel, by_block = (jax.device_get(panoptic_stats(*args, num_categories=c, label_divisor=div, max_segments=s,
                                                      mixed_fraction=f, with_confusion=True)) for f in (1.0, 0.99))
  _assert_same_counts(by_pixel, by_block)
  return by_pixel


def _assert_same_counts(by_pixel, by_block):
  """Equal outputs, but for the mixed tile / row counts (the pixel path has none)."""
  assert np.all(by_block["num_mixed_blocks"] <= by_block["max_mixed_blocks"])
  for key in by_pixel:
    if key not in ("num_mixed_blocks", "max_mixed_blocks"):
      np.testing.assert_array_equal(by_pixel[key], by_block[key], err_msg=key)


def _region_maps(rng, b, h, w, c, div):
  """Random canonical GT / prediction / crowd maps made of rectangles (VOID, crowd and UNLISTED included)."""
  gt = np.full((b, h, w), -1, np.int32)
  crowd = np.full((b, h, w), NO_CROWD, np.int32)
  for k in range(b):
    for _ in range(int(rng.integers(5, 25))):
      y, x = rng.integers(0, h), rng.integers(0, w)
      sh, sw = rng.integers(1, h // 2), rng.integers(1, w // 2)
      gt[k, y:y + sh, x:x + sw] = rng.integers(0, c) * div + rng.integers(0, 5)
    for value in (int(rng.integers(0, c)), UNLISTED):
      y, x = rng.integers(0, h), rng.integers(0, w)
      crowd[k, y:y + h // 6, x:x + w // 6] = value
  pred = np.roll(gt, (int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(1, 2))
  pred[:, : h // 8] = np.where(rng.random((b, h // 8, w)) < 0.02, 1, pred[:, : h // 8])
  return gt, pred, crowd


@pytest.mark.slow
@pytest.mark.parametrize("h,w", [(61, 83), (48, 64)])  # 61x83: padded to whole tiles.
def test_block_counting_equals_pixel_counting(h, w):
  rng = np.random.default_rng(h)
  gt, pred, crowd = _region_maps(rng, 4, h, w, c=5, div=10)
  outs = {f: jax.device_get(panoptic_stats(gt, pred, crowd, num_categories=5, label_divisor=10, max_segments=64,
                                           with_confusion=True, mixed_fraction=f)) for f in (1.0, 0.99)}
  assert np.all(outs[0.99]["num_mixed_blocks"] > 0) and outs[1.0]["tp"].sum() > 0  # Mixed tiles and rows.
  _assert_same_counts(outs[1.0], outs[0.99])
  # Too little room for mixed tiles: the accumulator refuses the batch, the Evaluator grows mixed_fraction.
  few = panoptic_stats(gt, pred, crowd, num_categories=5, label_divisor=10, max_segments=64, mixed_fraction=0.2)
  with pytest.raises(MixedBlockOverflowError, match="raise mixed_fraction"):
    PanopticQualityAccumulator([f"c{k}" for k in range(5)], [True] * 5).update(few)
  ev = evaluator_lib.Evaluator([f"c{k}" for k in range(5)], [True] * 5, 10, batch_size=4, max_segments=64,
                               mixed_fraction=0.2)
  for k in range(4):
    ev.add(gt[k], pred[k], gt_crowd=crowd[k])
  result = ev.result()
  assert ev.mixed_fraction > 0.2
  assert [result["panoptic"]["per_category"][f"c{k}"]["tp"] for k in range(5)] == outs[1.0]["tp"].sum(axis=0).tolist()


@pytest.mark.slow
def test_no_crowd_map_equals_an_empty_one_and_the_evaluator_drops_empty_ones():
  rng = np.random.default_rng(3)
  gt, pred, crowd = _region_maps(rng, 4, 48, 64, c=5, div=10)
  crowd[2:] = NO_CROWD
  kw = dict(num_categories=5, label_divisor=10, max_segments=64, with_confusion=True)
  general = jax.device_get(panoptic_stats(gt[2:], pred[2:], crowd[2:], **kw))
  crowd_free = jax.device_get(panoptic_stats(gt[2:], pred[2:], None, **kw))
  for key in general:
    np.testing.assert_array_equal(general[key], crowd_free[key], err_msg=key)
  # Batches of 2: the first has a crowd map, the second none (an empty map is dropped, the other was not given).
  ev = evaluator_lib.Evaluator([f"c{k}" for k in range(5)], [True] * 5, 10, batch_size=2, max_segments=64)
  for k, cr in enumerate([crowd[0], crowd[1], crowd[2], None]):
    ev.add(gt[k], pred[k], gt_crowd=cr)
  assert ev._pending == [] and ev.pq.num_images == 4
  reference = jax.device_get(panoptic_stats(gt, pred, crowd, **kw, mixed_fraction=1.0))
  result = ev.result()["panoptic"]["per_category"]
  for key in ("tp", "fp", "fn"):
    assert [result[f"c{k}"][key] for k in range(5)] == reference[key].sum(axis=0).tolist(), key


def test_aligned_host_maps_are_not_copied_by_device_put():
  maps = aligned_full((3, 48, 64), -1)
  assert maps.dtype == np.int32 and maps.ctypes.data % HOST_ALIGNMENT == 0 and np.all(maps == -1)
  # JAX's CPU client aliases aligned numpy memory: the reason the Evaluator builds its batches this way.
  assert jax.device_put(maps, jax.local_devices()[0]).unsafe_buffer_pointer() == maps.ctypes.data


def _crafted_maps():
  """16x24 maps (2x3 tiles of 8x8) that reach every counting level: uniform tiles, a mixed tile of uniform rows,
  mixed rows, lone pixels, a crowd tile. Labels: category * 100 + instance."""
  gt = np.full((16, 24), -1)
  gt[:8, :16] = 101
  gt[4:8, 8:16] = 102  # Tile (0, 1): a horizontal edge, its rows stay uniform.
  gt[:8, 16:20], gt[:8, 20:24] = 201, 202  # Tile (0, 2): a vertical edge, 8 mixed rows.
  gt[9, 3], gt[11, 5] = 5, 6  # Tile (1, 0): two one-pixel segments, 2 mixed rows.
  crowd = np.full_like(gt, NO_CROWD)
  crowd[8:, 16:] = 2  # Tile (1, 2): a crowd region of category 2.
  pred = np.where((gt == 5) | (gt == 6), -1, gt)
  pred[8:, 16:] = 203  # Lies in the crowd of its category: forgiven.
  return gt, pred, crowd


def test_every_counting_level_and_row_overflow():
  gt, pred, crowd = (x[None].astype(np.int32) for x in _crafted_maps())
  kw = dict(num_categories=3, label_divisor=100, max_segments=16, with_confusion=True)
  by_pixel, by_block = (jax.device_get(panoptic_stats(gt, pred, crowd, mixed_fraction=f, **kw)) for f in (1.0, 0.5))
  assert by_block["num_mixed_blocks"].tolist() == [[3, 10]]  # Tiles (0, 1), (0, 2), (1, 0); 8 + 2 rows.
  _assert_same_counts(by_pixel, by_block)
  r = _result(by_block)["per_category"]
  assert [(r[f"c{k}"]["tp"], r[f"c{k}"]["fp"], r[f"c{k}"]["fn"]) for k in range(3)] == [(0, 0, 2), (2, 0, 0),
                                                                                          (2, 0, 0)]
  assert r["c1"]["iou_sum"] == r["c2"]["iou_sum"] == 2.0
  # Room for the 3 mixed tiles but only 9 mixed rows.
  few = jax.device_get(panoptic_stats(gt, pred, crowd, mixed_fraction=0.34, **kw))
  assert few["max_mixed_blocks"].tolist() == [[3, 9]]
  with pytest.raises(MixedBlockOverflowError, match="3 tiles of 8x8 pixels and 10 rows of 8 pixels"):
    _result(few)


def test_keys_at_bitmask_word_boundaries():
  # Keys 0, 31 | 32, 63 | 64, 95 (label divisor 32): first and last bits of the presence words; GT == prediction.
  values = np.array([0, 31, 32, 63, 64, 95])
  gt = np.tile(np.repeat(values, [5, 9, 8, 11, 7, 8])[:, None], (1, 16))  # Bands across tiles.
  gt[20:22, 3:6] = 64  # Mixed rows.
  for f in (1.0, 0.99):
    stats = jax.device_get(panoptic_stats(gt[None], gt[None], num_categories=3, label_divisor=32, max_segments=8,
                                          mixed_fraction=f))
    assert np.all(stats["num_mixed_blocks"] <= stats["max_mixed_blocks"])
    assert stats["tp"].tolist() == [[2, 2, 2]] and stats["fp"].sum() == stats["fn"].sum() == 0
    assert stats["num_gt_slots"].tolist() == stats["num_pred_slots"].tolist() == [6]
    areas = sorted(int((gt == v).sum()) for v in values)
    assert sorted(stats["match_intersection"][0][:6].tolist()) == areas
    assert np.array_equal(stats["match_intersection"], stats["match_union"])


def _result(stats, c=3):
  acc = PanopticQualityAccumulator([f"c{k}" for k in range(c)], [True, False, True][:c])
  acc.update(stats)
  return acc.result()


def test_empty_prediction_all_false_negatives():
  gt = np.array([[101, 101, 200], [101, 201, -1]])
  r = _result(_stats(gt, np.full_like(gt, -1)))
  assert [r["per_category"][f"c{k}"]["fn"] for k in range(3)] == [0, 1, 2]  # 101: category 1; 200, 201: 2.
  assert r["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 2}


def test_everything_void_gives_n_zero():
  void = np.full((4, 5), -1)
  r = _result(_stats(void, void))
  for group in ("All", "Things", "Stuff"):
    assert r[group] == {"pq": None, "sq": None, "rq": None, "n": 0}
  assert not any(e["counted"] for e in r["per_category"].values())
  table = evaluator_lib.format_table({"panoptic": r, "semantic": {"mIoU": None, "n_classes_with_gt": 0,
                                                                  "n_classes_with_union": 0,
                                                                  "mIoU_classes_with_union": None},
                                      "instance": {"computed": False, "reason": "AP not computed: test"}})
  assert "no category with segments" in table


@pytest.mark.slow
def test_single_category_iou_boundary_and_void_union():
  # GT segment of 4 px; the prediction covers 2 of them + 2 GT-VOID px: union = 4 + 4 - 2 - 2 = 4, IoU = 0.5 exactly,
  # which is not > 0.5: no match. Its VOID share is 2/4 = 0.5, not > 0.5: an FP too.
  gt = np.array([[5, 5, 5, 5, -1, -1]])
  pred = np.array([[5, 5, -1, -1, 5, 5]])
  e = _result(_stats(gt, pred, c=1, div=100), c=1)["per_category"]["c0"]
  assert (e["tp"], e["fp"], e["fn"]) == (0, 1, 1)
  # One more predicted pixel on GT VOID: IoU = 2 / (4 + 5 - 2 - 3) = 0.5 still; VOID share 3/5 > 0.5: forgiven.
  gt = np.array([[5, 5, 5, 5, -1, -1, -1]])
  pred = np.array([[5, 5, -1, -1, 5, 5, 5]])
  e = _result(_stats(gt, pred, c=1, div=100), c=1)["per_category"]["c0"]
  assert (e["tp"], e["fp"], e["fn"]) == (0, 0, 1)
  # A match: 3 of 4 covered, union = 4 + 4 - 3 - 1 = 4, IoU = 0.75.
  gt = np.array([[5, 5, 5, 5, -1]])
  pred = np.array([[7, 7, 7, -1, 7]])
  e = _result(_stats(gt, pred, c=1, div=100), c=1)["per_category"]["c0"]
  assert (e["tp"], e["fp"], e["fn"], e["iou_sum"]) == (1, 0, 0, 0.75)


@pytest.mark.slow
def test_crowd_forgives_same_category_only():
  # Crowd of category 0 covers the right half; a predicted category-0 segment lies mostly inside it.
  gt = np.array([[1, 1, -1, -1, -1, -1]] * 2)
  crowd = np.array([[-1, -1, 0, 0, 0, 0]] * 2)
  pred_same = np.array([[1, 1, 2, 2, 2, 2]] * 2)
  r = _result(_stats(gt, pred_same, crowd, c=1, div=100), c=1)["per_category"]["c0"]
  assert (r["tp"], r["fp"], r["fn"]) == (1, 0, 0)
  pred_other = np.array([[1, 1, 102, 102, 102, 102]] * 2)  # Category 1 over a category-0 crowd: an FP.
  r = _result(_stats(gt, pred_other, crowd, c=2, div=100), c=2)["per_category"]
  assert (r["c0"]["tp"], r["c1"]["fp"]) == (1, 1)


@pytest.mark.slow
def test_segment_overflow_is_a_clear_error():
  gt = np.arange(40).reshape(4, 10)
  with pytest.raises(SegmentOverflowError, match="max_segments=16"):
    _result(_stats(gt, gt, c=1, div=100, s=16), c=1)
  # The Evaluator grows max_segments by itself.
  ev = evaluator_lib.Evaluator(["a"], [True], 100, batch_size=1, max_segments=16, shard=False)
  ev.add(gt, gt)
  assert ev.result()["panoptic"]["per_category"]["a"]["tp"] == 40


@pytest.mark.slow
def test_sharded_batch_equals_unsharded():
  rng = np.random.default_rng(0)
  maps = []
  for _ in range(16):
    g, p = coco_cases.random_pair(rng, 1, unlisted=False)
    maps.append((np.where(g["ids"] > 0, g["ids"] % 7 * 100 + 1, -1), np.where(p["ids"] > 0, p["ids"] % 7 * 100 + 1,
                                                                            -1)))
  results = []
  for shard in (True, False):
    ev = evaluator_lib.Evaluator([f"c{k}" for k in range(7)], [True] * 7, 100, batch_size=8, shard=shard)
    assert (ev._sharding is not None) == (shard and len(jax.local_devices()) == 8)
    for g, p in maps:
      ev.add(g, p)
    results.append(ev.result()["panoptic"])
  assert results[0] == results[1]


def test_shape_mismatch_names_the_image():
  ev = evaluator_lib.Evaluator(["a"], [True], 100)
  with pytest.raises(evaluator_lib.EvaluationError, match="img7.*same size"):
    ev.add(np.zeros((4, 4)), np.zeros((4, 5)), name="img7")



def test_many_sharded_batches_in_flight(tmp_path):
  # An evaluation loop may dispatch batches ahead of reading their results. When the statistics were summed across
  # devices inside the computation, 50 batches in flight on 2 CPU devices hung: XLA:CPU's rendezvous filled the
  # thread pool with waiting threads (20 did not). 2 devices in a fresh process, as the hang needed.
  script = tmp_path / "in_flight.py"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
      os.environ["JAX_PLATFORMS"] = "cpu"
      sys.path.insert(0, {os.getcwd()!r})
      import jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec
      from panoptic_jax.evaluation.panoptic_quality import panoptic_stats
      sharding = NamedSharding(Mesh(np.array(jax.local_devices()), ("data",)), PartitionSpec("data"))
      rng = np.random.default_rng(0)
      gt = (rng.integers(0, 5, (4, 4, 4)).repeat(16, 1).repeat(16, 2) * 10).astype(np.int32)
      pred = np.roll(gt, 3, axis=2)
      kw = dict(num_categories=5, label_divisor=10, max_segments=16)
      batch = jax.device_put((gt, pred), sharding)
      in_flight = jax.device_get([panoptic_stats(*batch, **kw) for _ in range(64)])
      reference = jax.device_get(panoptic_stats(gt, pred, **kw))
      assert all(np.array_equal(out[k], reference[k]) for out in in_flight for k in reference)
  """))
  subprocess.run([sys.executable, str(script)], check=True, timeout=120)
