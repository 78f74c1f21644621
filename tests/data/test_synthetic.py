"""The procedural street-scene dataset (panoptic_jax/data/synthetic.py): format, content, determinism, caching."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from panoptic_jax.data import dataset_format as fmt
from panoptic_jax.data import synthetic
from panoptic_jax.data.storage import open_storage

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_TRAIN, NUM_VAL, SEED = 8, 4, 3


def _env():
  return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("synthetic")
  synthetic.generate(str(out), NUM_TRAIN, NUM_VAL, SEED, num_workers=0, progress=False)
  return out


def _decode_split(root: pathlib.Path):
  """[(stem, image, panoptic at image size, raw pages)] for one split."""
  info = fmt.parse_metadata((root / "metadata.yaml").read_text())
  examples = []
  for image_path in sorted((root / "images").iterdir()):
    image = fmt.decode_image(image_path.read_bytes(), str(image_path))
    tiff = (root / info.annotations / f"{image_path.stem}.tif").read_bytes()
    panoptic = fmt.decode_annotation(tiff, info, image.shape[:2], where=image_path.stem)
    with tifffile.TiffFile(io.BytesIO(tiff)) as t:
      pages = [p.asarray() for p in t.pages]
    examples.append((image_path.stem, image, panoptic, pages))
  return info, examples


def test_layout_and_metadata(dataset):
  assert sorted(p.name for p in dataset.iterdir()) == ["train", "val"]
  for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
    root = dataset / split
    assert sorted(p.name for p in root.iterdir()) == ["images", "metadata.yaml", "panoptic_maps"]
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:06d}.jpg" for i in range(count)]
    assert sorted(p.name for p in (root / "panoptic_maps").iterdir()) == [f"{i:06d}.tif" for i in range(count)]
    info = fmt.parse_metadata((root / "metadata.yaml").read_text())
    assert info == synthetic.INFO
    assert set(np.array(info.categories)[info.thing_ids]) == {"car", "person", "cyclist", "traffic sign"}


def test_content_things_stuff_void_and_encodings(dataset):
  info, examples = _decode_split(dataset / "train")
  _, val_examples = _decode_split(dataset / "val")
  examples += val_examples
  categories, thing_counts, void_images = set(), [], 0
  half_res, spread_uint16 = 0, 0
  for stem, image, panoptic, pages in examples:
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8
    assert panoptic.shape == (128, 256)
    values = np.unique(panoptic)
    present = {int(v) // info.label_divisor for v in values if v != fmt.VOID}
    categories |= present
    assert {synthetic.ROAD, synthetic.SKY, synthetic.BUILDING} <= present, stem
    thing_counts.append(sum(1 for v in values if v != fmt.VOID and info.is_thing[v // info.label_divisor]))
    void_fraction = float(np.mean(panoptic == fmt.VOID))
    assert void_fraction < 0.25, (stem, void_fraction)  # void is small
    void_images += void_fraction > 0
    if pages[1].shape == (64, 128):
      half_res += 1
      assert pages[0].shape == (3, 64, 128)
    else:
      assert pages[0].shape == (3, 128, 256) and pages[1].shape == (128, 256)
    if pages[1].dtype == np.uint16:
      spread_uint16 += 1
      assert pages[1].max() >= 300 and np.all(pages[1] % 300 == 0)
    # Stuff has instance 0; thing instances are numbered 1..K per category.
    for v in values[values != fmt.VOID]:
      category, instance = divmod(int(v), info.label_divisor)
      assert (instance > 0) == info.is_thing[category], (stem, v)
  assert categories == set(range(info.num_classes)), "every category appears somewhere"
  assert min(thing_counts) >= 1 and np.mean(thing_counts) >= 3
  assert void_images >= 1
  assert half_res >= 2 and spread_uint16 >= 2


def test_colour_does_not_give_the_class(dataset):
  """Thing instances of different classes share colours: mean colours of cars and persons overlap in range."""
  _, examples = _decode_split(dataset / "train")
  means = {synthetic.CAR: [], synthetic.PERSON: []}
  for _, image, panoptic, _ in examples:
    for v in np.unique(panoptic):
      if v != fmt.VOID and v // 1000 in means and np.sum(panoptic == v) >= 30:
        means[v // 1000].append(image[panoptic == v].mean(0))
  cars, persons = np.array(means[synthetic.CAR]), np.array(means[synthetic.PERSON])
  assert len(cars) >= 5 and len(persons) >= 3
  assert cars.std(0).mean() > 15 and persons.std(0).mean() > 10  # instances vary in colour
  lo, hi = np.maximum(cars.min(0), persons.min(0)), np.minimum(cars.max(0), persons.max(0))
  assert np.all(hi > lo)  # the colour ranges overlap in every channel


def test_deterministic_across_worker_counts_and_seeds(dataset, tmp_path):
  out = tmp_path / "again"
  summary = synthetic.generate(str(out), NUM_TRAIN, NUM_VAL, SEED, num_workers=2, progress=False)
  assert summary["images"] == NUM_TRAIN + NUM_VAL
  assert _files(out) == _files(dataset)  # byte-identical, in parallel too
  stem, jpeg, tiff, _ = synthetic.encode_example(SEED + 1, "train", 0)
  assert stem == "000000"
  assert jpeg != (dataset / "train/images/000000.jpg").read_bytes()
  assert tiff != (dataset / "train/panoptic_maps/000000.tif").read_bytes()
  # Splits draw from different streams: val/000000 is not train/000000.
  assert (dataset / "val/images/000000.jpg").read_bytes() != (dataset / "train/images/000000.jpg").read_bytes()


def test_scene_without_random_things_gets_a_car_even_with_a_long_focal_length():
  # Seed 0, val 137 at 128x256 draws no car, person or cyclist, and a camera whose farthest learnable car depth is
  # below the fallback car's nearest (6 m): rendering it once raised "high - low < 0".
  _, _, tiff, stats = synthetic.encode_example(0, "val", 137, 128, 256)
  panoptic = fmt.decode_annotation(tiff, synthetic.INFO, (128, 256), where="val/000137")
  assert stats["things"] >= 1
  assert np.any(panoptic // synthetic.INFO.label_divisor == synthetic.INFO.categories.index("car"))


def test_passes_validate(dataset, tmp_path):
  for split, count in (("train", NUM_TRAIN), ("val", NUM_VAL)):
    report = tmp_path / f"{split}.json"
    result = subprocess.run([sys.executable, "-m", "panoptic_jax.data.validate", str(dataset / split), "--json",
                             str(report), "--workers", "0", "--no_progress"], capture_output=True, text=True,
                            env=_env(), timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(report.read_text())
    assert summary["valid"] and summary["images"] == count and summary["annotated_images"] == count
    assert summary["unpaired_images"]["count"] == 0 and summary["unpaired_annotations"]["count"] == 0


def test_cli_writes_to_s3(s3_bucket, s3_server, tmp_path):
  location = f"s3://{s3_bucket}/demo"
  result = subprocess.run([sys.executable, "-m", "panoptic_jax.data.synthetic", "--out", location, "--num_train", "2",
                           "--num_val", "1", "--seed", "5", "--height", "64", "--width", "128", "--endpoint_url",
                           s3_server.endpoint_url, "--num_workers", "0"], capture_output=True, text=True, env=_env(),
                          timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "synthetic" in result.stderr  # the progress bar goes to stderr
  assert json.loads(result.stdout.strip().splitlines()[-1])["images"] == 3
  train = open_storage(f"{location}/train", endpoint_url=s3_server.endpoint_url)
  assert train.list_files("images") == ["000000.jpg", "000001.jpg"]
  assert train.list_files("panoptic_maps") == ["000000.tif", "000001.tif"]
  assert fmt.parse_metadata(train.read_bytes("metadata.yaml").decode()) == synthetic.INFO
  _, jpeg, tiff, _ = synthetic.encode_example(5, "train", 1, 64, 128)
  assert train.read_many(["images/000001.jpg", "panoptic_maps/000001.tif"]) == [jpeg, tiff]
  val = open_storage(f"{location}/val", endpoint_url=s3_server.endpoint_url)
  assert val.list_files("images") == ["000000.jpg"]


def test_cli_rejects_bad_sizes(tmp_path):
  with pytest.raises(ValueError, match=r"even.*found 63x128"):
    synthetic.generate(str(tmp_path), 1, 1, height=63, width=128)
  result = subprocess.run([sys.executable, "-m", "panoptic_jax.data.synthetic", "--out", str(tmp_path), "--height",
                           "63"], capture_output=True, text=True, env=_env(), timeout=60)
  assert result.returncode == 2 and "63x256" in result.stderr


def test_ensure_demo_dataset_caches_and_regenerates(tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  path = pathlib.Path(synthetic.ensure_demo_dataset(cache, num_train=2, num_val=1, seed=0, size=(64, 128),
                                                    num_workers=0))
  assert path == cache / "synthetic"
  assert len(list((path / "train/images").iterdir())) == 2 and (path / "val/metadata.yaml").is_file()
  marker = json.loads((path / "GENERATED.json").read_text())
  assert marker == {"version": synthetic.GENERATOR_VERSION, "num_train": 2, "num_val": 1, "seed": 0, "height": 64,
                    "width": 128}
  first = _files(path)

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a dataset that was already in the cache")

  monkeypatch.setattr(synthetic, "generate", fail)
  assert synthetic.ensure_demo_dataset(cache, 2, 1, 0, (64, 128)) == str(path)
  monkeypatch.undo()

  # A different request replaces the cached dataset; nothing temporary is left behind.
  synthetic.ensure_demo_dataset(cache, num_train=3, num_val=1, seed=0, size=(64, 128), num_workers=0)
  assert len(list((path / "train/images").iterdir())) == 3
  assert _files(path)["train/images/000000.jpg"] == first["train/images/000000.jpg"]
  assert sorted(p.name for p in cache.iterdir() if p.name != ".synthetic.lock") == ["synthetic"]


def test_ensure_demo_dataset_interrupted_leaves_no_partial_dataset(tmp_path, monkeypatch):
  cache = tmp_path / "cache"

  def interrupted(out, *args, **kwargs):
    (pathlib.Path(out) / "train").mkdir()
    raise KeyboardInterrupt

  monkeypatch.setattr(synthetic, "generate", interrupted)
  with pytest.raises(KeyboardInterrupt):
    synthetic.ensure_demo_dataset(cache, 2, 1, 0, (64, 128))
  assert sorted(p.name for p in cache.iterdir() if p.name != ".synthetic.lock") == []


@pytest.mark.slow
def test_perfect_stride4_predictions_score_high_pq_on_the_demo_scenes():
  """The demo's labels are learnable at its output stride: perfect logits at the stride-4 target pixels, upsampled
  and merged as the model's are (demo preset), score well at full resolution. This bounds what any model can reach
  in the demo, so thin labelled structures (far poles, bicycle frames) that the merge cannot keep would show here."""
  import jax.numpy as jnp  # Only this test needs JAX.

  from panoptic_jax.data import transforms
  from panoptic_jax.evaluation.evaluator import Evaluator
  from panoptic_jax.inference import postprocess

  info, stride, slots = synthetic.INFO, 4, 32
  height, width = 128, 256
  crop = (height + 1, width + 1)
  evaluator = Evaluator(info.categories, info.is_thing, info.label_divisor, shard=False)
  transform = transforms.EvalTransform(crop, transforms.TargetConfig.from_info(info, slots, stride), resize=False)
  for index in range(16):
    image, panoptic = synthetic.render_scene(np.random.default_rng([0, 1, index]), height, width)
    targets = transform.map({"image": image, "panoptic": panoptic, "index": index})
    slot_ids, slot_classes = targets["slot_ids"], targets["slot_classes"]
    mask_logits = np.where(slot_ids[..., None] == np.arange(slots), 20.0, -20.0).astype(np.float32)
    class_logits = np.full((slots, info.num_classes + 1), -20.0, np.float32)
    class_logits[np.arange(slots), np.where(slot_classes >= 0, slot_classes, info.num_classes)] = 20.0
    merged = postprocess.postprocess(jnp.asarray(mask_logits[None]), jnp.asarray(class_logits[None]), crop,
                                     jnp.asarray(info.is_thing), postprocess.get_preset("synthetic"),
                                     info.label_divisor)
    evaluator.add(panoptic, np.asarray(merged["panoptic"][0, :height, :width]))
  result = evaluator.result()["panoptic"]
  assert result["All"]["pq"] > 0.7, result["All"]
  assert result["Things"]["pq"] > 0.6 and result["Stuff"]["pq"] > 0.7, (result["Things"], result["Stuff"])
