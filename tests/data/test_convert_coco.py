"""COCO panoptic -> dataset format: fidelity (segment by segment and PQ = 1 with hotcoco), crowd modes, resume,
per-file failures (corrupt PNG, area mismatch, unlisted ids, missing image), colours, workers and S3 output."""

import json
import pathlib
import shutil

import hotcoco.panoptic
import numpy as np
import pytest
import tifffile
from PIL import Image

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data.convert import __main__ as cli
from panoptic_jax.data.convert import coco, common
from panoptic_jax.data.storage import open_storage


def _ids(png: pathlib.Path) -> np.ndarray:
  rgb = np.asarray(Image.open(png).convert("RGB")).astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


@pytest.fixture
def sample(fixtures):
  """panopticapi's 2 COCO val images (with crowd): (images dir, json, png dir)."""
  root = fixtures / "panopticapi_sample"
  return root / "input_images", root / "panoptic_examples.json", root / "panoptic_examples"


@pytest.fixture
def tfm(fixtures, tmp_path):
  """tensorflow/models' 4 masks (6 categories without colours, one crowd); images synthesised at the JSON's sizes."""
  root = fixtures / "tfmodels_deeplab_eval_testdata"
  images = tmp_path / "tfm_images"
  images.mkdir()
  for image in json.loads((root / "coco_gt.json").read_text())["images"]:
    Image.new("RGB", (image["width"], image["height"]), (90, 120, 30)).save(images / image["file_name"])
  return images, root / "coco_gt.json", root / "coco_gt"


def _copy_sample(sample, tmp_path):
  images, js, pngs = sample
  shutil.copytree(pngs, tmp_path / "pngs")
  shutil.copy(js, tmp_path / "gt.json")
  return images, tmp_path / "gt.json", tmp_path / "pngs"


def _load(out: pathlib.Path):
  info = fmt.parse_metadata((out / "metadata.yaml").read_text())
  maps = {p.stem: fmt.decode_annotation(p.read_bytes(), info, where=str(p)) for p in (out / "panoptic_maps").iterdir()}
  return info, maps


def _check_fidelity(out: pathlib.Path, images: pathlib.Path, gt_json: pathlib.Path, pngs: pathlib.Path, crowd: str):
  """Every non-crowd segment is exactly one canonical segment with its pixels and category; crowd is as chosen."""
  data = json.loads(gt_json.read_text())
  info, maps = _load(out)
  index = {c["id"]: i for i, c in enumerate(data["categories"])}
  assert info.categories == tuple(c["name"] for c in data["categories"])
  assert info.is_thing == tuple(bool(c["isthing"]) for c in data["categories"])
  file_of = {im["id"]: im["file_name"] for im in data["images"]}
  assert len(maps) == len(data["annotations"])
  for ann in data["annotations"]:
    stem = pathlib.Path(file_of[ann["image_id"]]).stem
    assert (out / "images" / file_of[ann["image_id"]]).read_bytes() == (images / file_of[ann["image_id"]]).read_bytes()
    ids, pan = _ids(pngs / ann["file_name"]), maps[stem]
    assert pan.shape == ids.shape
    covered = np.zeros(ids.shape, bool)
    per_class = {}
    for s in ann["segments_info"]:
      mask = ids == s["id"]
      covered |= mask
      values = np.unique(pan[mask])
      assert len(values) == 1, (stem, s)
      value = int(values[0])
      if s["iscrowd"] and crowd == "ignore":
        assert value == fmt.VOID
        continue
      category = index[s["category_id"]]
      assert value // info.label_divisor == category
      if not s["iscrowd"]:
        assert np.array_equal(pan == value, mask), (stem, s)  # Exactly these pixels: nothing merged in.
      if info.is_thing[category] and not s["iscrowd"]:
        per_class.setdefault(category, []).append(value % info.label_divisor)
    assert (pan[~covered] == fmt.VOID).all()
    with tifffile.TiffFile(out / info.annotations / f"{stem}.tif") as tiff:  # On disk: ids unique in the image.
      rgb, disk_ids = (page.asarray() for page in tiff.pages)
    codes = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2]
    pairs = np.unique(np.stack([disk_ids.ravel(), codes.ravel()])[:, disk_ids.ravel() > 0], axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]
    offset = {c: int(crowd == "keep" and any(s["iscrowd"] and index[s["category_id"]] == c
                                             for s in ann["segments_info"])) for c in per_class}
    for c, instances in per_class.items():  # DeepLab2's numbering: 1..n per class in segments_info order.
      assert instances == list(range(1 + offset[c], len(instances) + 1 + offset[c]))


def _pq_against_gt(out: pathlib.Path, gt_json: pathlib.Path, pngs: pathlib.Path, tmp_path: pathlib.Path) -> dict:
  """Writes the converted maps back as a COCO panoptic prediction and scores it against the original GT (hotcoco)."""
  data = json.loads(gt_json.read_text())
  info, maps = _load(out)
  category_ids = [c["id"] for c in data["categories"]]
  pred_dir = tmp_path / "pred"
  pred_dir.mkdir()
  annotations = []
  for ann in data["annotations"]:
    stem = pathlib.Path(next(im["file_name"] for im in data["images"] if im["id"] == ann["image_id"])).stem
    pan = maps[stem]
    ids = np.zeros(pan.shape, np.int64)
    segments = []
    for k, value in enumerate(v for v in np.unique(pan) if v != fmt.VOID):
      mask = pan == value
      ids[mask] = k + 1
      segments.append({"id": k + 1, "category_id": category_ids[value // info.label_divisor],
                       "area": int(mask.sum()), "iscrowd": 0})
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(pred_dir / ann["file_name"])
    annotations.append({"image_id": ann["image_id"], "file_name": ann["file_name"], "segments_info": segments})
  pred_json = tmp_path / "pred.json"
  pred_json.write_text(json.dumps({**data, "annotations": annotations}))
  return hotcoco.panoptic.pq_compute(str(gt_json), str(pred_json), str(pngs), str(pred_dir))


@pytest.mark.parametrize("crowd", ["ignore", "keep"])
def test_sample_fidelity_and_pq(sample, tmp_path, crowd):
  images, gt_json, pngs = sample
  out = tmp_path / "out"
  summary = coco.convert(str(images), str(gt_json), str(pngs), str(out), crowd=crowd, progress=False)
  assert summary.ok and len(summary.converted) == 2
  assert summary.stats[f"crowd {'kept' if crowd == 'keep' else 'to void'}"] == 3
  _check_fidelity(out, images, gt_json, pngs, crowd)
  result = _pq_against_gt(out, gt_json, pngs, tmp_path)
  assert result["All"]["pq"] == pytest.approx(1.0, abs=1e-12)
  assert result["All"]["n"] == len({s["category_id"] for a in json.loads(gt_json.read_text())["annotations"]
                                    for s in a["segments_info"] if not s["iscrowd"]})
  metadata = (out / "metadata.yaml").read_text()
  assert f"--crowd {crowd}" in metadata


def test_tfmodels_fixture_generated_colours_and_pq(tfm, tmp_path):
  images, gt_json, pngs = tfm
  out = tmp_path / "out"
  summary = coco.convert(str(images), str(gt_json), str(pngs), str(out), progress=False)
  assert summary.ok and len(summary.converted) == 4, summary.text()
  info, _ = _load(out)
  assert all(c is not None and c != (0, 0, 0) for c in info.colors) and len(set(info.colors)) == len(info.colors)
  _check_fidelity(out, images, gt_json, pngs, "ignore")
  assert _pq_against_gt(out, gt_json, pngs, tmp_path)["All"]["pq"] == pytest.approx(1.0, abs=1e-12)


def test_official_colours_kept(sample, tmp_path):
  images, gt_json, pngs = sample
  coco.convert(str(images), str(gt_json), str(pngs), str(tmp_path), progress=False)
  info, _ = _load(tmp_path)
  assert info.colors == tuple(tuple(c["color"]) for c in json.loads(gt_json.read_text())["categories"])


def test_resolve_colors_collisions_black_and_missing():
  colors = common.resolve_colors(["a", "b", "c", "d", "e"], [(10, 10, 10), (10, 10, 10), (0, 0, 0), None, (9, 10, 10)])
  assert colors[0] == (10, 10, 10)
  assert colors[1] == (9, 10, 10)  # The nearest free colour (L1 1, lowest RGB first).
  assert colors[2] != (0, 0, 0) and max(colors[2]) == 1
  assert colors[4] != (9, 10, 10)  # Taken by b now: moved too.
  assert len(set(colors)) == 5 and (0, 0, 0) not in colors
  assert common.resolve_colors(["a", "b", "c", "d", "e"],
                               [(10, 10, 10), (10, 10, 10), (0, 0, 0), None, (9, 10, 10)]) == colors  # Deterministic.


def test_resume_skips_done_files_and_redoes_missing(sample, tmp_path):
  images, gt_json, pngs = sample
  out = tmp_path / "out"
  first = coco.convert(str(images), str(gt_json), str(pngs), str(out), progress=False)
  before = {p.name: p.read_bytes() for p in (out / "panoptic_maps").iterdir()}
  second = coco.convert(str(images), str(gt_json), str(pngs), str(out), progress=False)
  assert len(first.converted) == 2 and not second.converted and sorted(second.skipped) == sorted(first.converted)
  (out / "panoptic_maps" / "000000142238.tif").unlink()  # As if interrupted between image and annotation.
  third = coco.convert(str(images), str(gt_json), str(pngs), str(out), progress=False)
  assert third.converted == ["000000142238"] and third.skipped == ["000000439180"]
  assert {p.name: p.read_bytes() for p in (out / "panoptic_maps").iterdir()} == before  # Idempotent.
  with pytest.raises(ValueError, match="--crowd ignore"):  # A resumed run may not mix conventions.
    coco.convert(str(images), str(gt_json), str(pngs), str(out), crowd="keep", progress=False)


def test_corrupt_png_fails_that_file_only(sample, tmp_path, capsys):
  images, gt_json, pngs = _copy_sample(sample, tmp_path)
  bad = pngs / "000000439180.png"
  bad.write_bytes(bad.read_bytes()[:300])
  out = tmp_path / "out"
  code = cli.main(["coco", "--images", str(images), "--panoptic_json", str(gt_json), "--panoptic_dir", str(pngs),
                   "--out", str(out), "--workers", "1", "--no_progress"])
  printed = capsys.readouterr().out
  assert code == 1
  assert "converted 1, skipped 0 (already done), failed 1" in printed
  assert "000000439180" in printed and "cannot decode as PNG" in printed and str(bad) in printed
  assert sorted(p.name for p in (out / "panoptic_maps").iterdir()) == ["000000142238.tif"]
  assert (out / "metadata.yaml").is_file()


def test_area_mismatch_unlisted_id_and_missing_image_fail_their_files(sample, tmp_path):
  images, gt_json, pngs = _copy_sample(sample, tmp_path)
  data = json.loads(gt_json.read_text())
  data["annotations"][0]["segments_info"][2]["area"] += 1
  sid = data["annotations"][0]["segments_info"][2]["id"]
  dropped = data["annotations"][1]["segments_info"].pop(4)
  data["images"].append({"id": 77, "file_name": "missing.jpg", "height": 10, "width": 10})
  data["annotations"].append({"image_id": 77, "file_name": "000000439180.png", "segments_info": []})
  data["images"].append({"id": 78, "file_name": "unannotated.jpg", "height": 10, "width": 10})
  gt_json.write_text(json.dumps(data))
  summary = coco.convert(str(images), str(gt_json), str(pngs), str(tmp_path / "out"), progress=False)
  reasons = dict(summary.failed)
  assert not summary.converted and len(summary.failed) == 3
  assert f"segment {sid}" in reasons["000000142238"] and "listed area" in reasons["000000142238"]
  assert "not listed in segments_info" in reasons["000000439180"] and str(dropped["id"]) in reasons["000000439180"]
  assert "missing.jpg" in reasons["missing"] and "cannot read" in reasons["missing"]
  assert summary.unpaired == [("unannotated.jpg", "listed in `images` but has no annotation")]


def test_two_workers_match_one(sample, tmp_path):
  images, gt_json, pngs = sample
  one, two = tmp_path / "one", tmp_path / "two"
  coco.convert(str(images), str(gt_json), str(pngs), str(one), workers=1, progress=False)
  summary = coco.convert(str(images), str(gt_json), str(pngs), str(two), workers=2, progress=False)
  assert summary.ok and len(summary.converted) == 2
  for path in one.rglob("*"):
    if path.is_file():
      assert (two / path.relative_to(one)).read_bytes() == path.read_bytes(), path


def test_s3_output_with_workers_and_resume(sample, tmp_path, s3_bucket, s3_server):
  images, gt_json, pngs = sample
  location = f"s3://{s3_bucket}/coco/val"
  summary = coco.convert(str(images), str(gt_json), str(pngs), location, endpoint_url=s3_server.endpoint_url,
                         workers=2, progress=False)
  assert summary.ok and len(summary.converted) == 2, summary.text()
  local = tmp_path / "local"
  coco.convert(str(images), str(gt_json), str(pngs), str(local), progress=False)
  storage = open_storage(location, s3_server.endpoint_url)
  assert storage.list_files("panoptic_maps") == ["000000142238.tif", "000000439180.tif"]
  for name in ("metadata.yaml", "images/000000142238.jpg", "panoptic_maps/000000439180.tif"):
    assert storage.read_bytes(name) == (local / name).read_bytes(), name
  again = coco.convert(str(images), str(gt_json), str(pngs), location, endpoint_url=s3_server.endpoint_url,
                       workers=2, progress=False)
  assert not again.converted and len(again.skipped) == 2


@pytest.mark.parametrize("crowd", ["ignore", "keep"])
def test_project_evaluator_scores_converted_gt_pq_1(sample, tmp_path, crowd):
  """`python -m panoptic_jax.evaluate --gt_json/--gt_folder <original> --pred <converted>` gives PQ = 1."""
  from panoptic_jax import evaluate  # pylint: disable=g-import-not-at-top  (JAX: only this test needs it)
  images, gt_json, pngs = sample
  out = tmp_path / "out"
  assert coco.convert(str(images), str(gt_json), str(pngs), str(out), crowd=crowd, progress=False).ok
  results = tmp_path / "results.json"
  assert evaluate.main(["--gt_json", str(gt_json), "--gt_folder", str(pngs), "--pred", str(out),
                        "--out", str(results)]) == 0
  panoptic = json.loads(results.read_text())["panoptic"]
  assert panoptic["All"]["pq"] == 1.0 and panoptic["All"]["n"] == 8
  assert all(c["fp"] == 0 and c["fn"] == 0 for c in panoptic["per_category"].values())
