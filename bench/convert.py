"""Benchmark: COCO panoptic -> dataset format conversion speed (images/s) with 1 and 2 worker processes.

  python bench/convert.py [--num 200] [--workers 1,2] [--keep DIR]

Synthesises `num` COCO-size examples in a temporary folder first (640x480 JPEGs of smooth noise, quality 90; panoptic
PNGs with 20 Voronoi segments: 14 thing instances, 1 thing crowd, 5 stuff, a void band along the boundaries; the
133 COCO categories from the shared fixtures when present), then runs the real converter
(`panoptic_jax.data.convert.coco.convert`, the code behind `python -m panoptic_jax.data.convert coco`) into a fresh
local output folder per worker count, and prints a markdown table with the machine, date and command. A per-stage
profile of one example (single process) shows where the time goes.

DeepLab2's build_coco_data.py is a known slow point (google-research/deeplab2#172): it runs in one process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from panoptic_jax.data import dataset_format as fmt  # noqa: E402
from panoptic_jax.data.convert import coco, common  # noqa: E402

_CATEGORIES = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "panopticapi_sample"
               / "panoptic_coco_categories.json")


def _categories() -> list[dict]:
  if _CATEGORIES.is_file():
    return json.loads(_CATEGORIES.read_text())
  rng = np.random.default_rng(1)
  return [{"id": i + 1, "name": f"c{i}", "isthing": int(i < 80), "color": rng.integers(1, 256, 3).tolist()}
          for i in range(133)]


def synthesise(root: pathlib.Path, num: int, height: int = 480, width: int = 640, segments: int = 20) -> None:
  """Writes root/images/*.jpg, root/panoptic/*.png and root/panoptic.json (COCO panoptic layout)."""
  rng = np.random.default_rng(0)
  categories = _categories()
  things = [c["id"] for c in categories if c["isthing"]]
  stuff = [c["id"] for c in categories if not c["isthing"]]
  (root / "images").mkdir(parents=True)
  (root / "panoptic").mkdir()
  yy, xx = np.mgrid[:height, :width]
  images, annotations = [], []
  for n in range(num):
    noise = rng.random((height // 16, width // 16, 3))
    image = np.asarray(Image.fromarray((noise * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR))
    Image.fromarray(image).save(root / "images" / f"{n:012d}.jpg", quality=90)
    seeds = rng.random((segments, 2)) * (height, width)
    dist = np.hypot(yy[..., None] - seeds[:, 0], xx[..., None] - seeds[:, 1])
    two = np.partition(dist, 1, axis=-1)[..., :2]
    nearest = dist.argmin(-1)
    ids = rng.choice(np.arange(1, 1 << 24), segments, replace=False)
    seg = np.where(two[..., 1] - two[..., 0] < 2.0, 0, ids[nearest])  # A void band along the boundaries.
    rgb = np.stack([seg % 256, seg // 256 % 256, seg // 65536], -1).astype(np.uint8)
    Image.fromarray(rgb).save(root / "panoptic" / f"{n:012d}.png")
    cats = list(rng.choice(things, 15)) + list(rng.choice(stuff, 5, replace=False))
    infos = [{"id": int(i), "category_id": int(c), "iscrowd": int(k == 14), "area": int((seg == i).sum())}
             for k, (i, c) in enumerate(zip(ids, cats))]
    images.append({"id": n, "file_name": f"{n:012d}.jpg", "height": height, "width": width})
    annotations.append({"image_id": n, "file_name": f"{n:012d}.png", "segments_info": infos})
  (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                  "categories": categories}))


def _profile(root: pathlib.Path) -> list[tuple[str, float]]:
  """Milliseconds per stage for one example, in this process (median of 5)."""
  info, index, examples, _, _ = coco.find_examples(str(root / "images"), str(root / "panoptic.json"),
                                                   str(root / "panoptic"))
  example = examples[0]
  stages = {
      "read + decode PNG -> ids": lambda: common.rgb_ids(common.decode_png(
          pathlib.Path(example.annotation_path).read_bytes(), "", ""), "", ""),
      "read + decode JPEG (check)": lambda: common.check_image(
          pathlib.Path(example.image_path).read_bytes(), "", (480, 640), None),
  }
  ids = stages["read + decode PNG -> ids"]()
  stages["segments -> canonical map"] = lambda: common.panoptic_from_segments(ids, example.segments, index, info,
                                                                              "ignore", "")
  panoptic, _ = stages["segments -> canonical map"]()
  stages["encode_annotation (TIFF)"] = lambda: fmt.encode_annotation(panoptic, info)
  stages["whole example (convert_example + encode)"] = lambda: fmt.encode_annotation(
      coco.convert_example(example, info, index)[1], info)
  out = []
  for name, fn in stages.items():
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      fn()
      times.append(time.perf_counter() - t0)
    out.append((name, 1000 * float(np.median(times))))
  return out


def _cpu() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num", type=int, default=200)
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--keep", default=None, help="synthesise into (and reuse) this folder instead of a temp one")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory(prefix="bench-convert-") as tmp:
    root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tmp) / "src"
    if not (root / "panoptic.json").is_file():
      t0 = time.perf_counter()
      synthesise(root, args.num)
      print(f"synthesised {args.num} examples in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows = []
    load = os.getloadavg()
    for workers in (int(w) for w in args.workers.split(",")):
      out = pathlib.Path(tmp) / f"out{workers}"
      t0 = time.perf_counter()
      summary = coco.convert(str(root / "images"), str(root / "panoptic.json"), str(root / "panoptic"), str(out),
                             workers=workers, progress=False)
      seconds = time.perf_counter() - t0
      if not summary.ok or len(summary.converted) != args.num:
        raise SystemExit(f"conversion failed: {summary.text()}")
      t0 = time.perf_counter()
      resumed = coco.convert(str(root / "images"), str(root / "panoptic.json"), str(root / "panoptic"), str(out),
                             workers=workers, progress=False)
      resume_s = time.perf_counter() - t0
      assert len(resumed.skipped) == args.num
      size = sum(p.stat().st_size for p in (out / "panoptic_maps").iterdir()) / args.num / 1024
      rows.append((workers, seconds, args.num / seconds, resume_s, size))
    profile = _profile(root)

  print(f"machine: {platform.node()}, {_cpu()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"numpy {np.__version__}, load average before the runs {load[0]:.1f} (others share these CPUs if > 0.5)")
  print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
  print(f"command: python {shlex.join(sys.argv)}")
  print(f"data: {args.num} synthetic COCO examples, 640x480 JPEG, 20 segments (14 things, 1 crowd, 5 stuff)")
  print()
  print("| workers | images | wall (s) incl. pool start | images/s | resume run, all skipped (s) | TIFF KiB / image |")
  print("|---|---|---|---|---|---|")
  for workers, seconds, rate, resume_s, size in rows:
    print(f"| {workers} | {args.num} | {seconds:.2f} | {rate:.1f} | {resume_s:.2f} | {size:.1f} |")
  print()
  print("| stage (one example, one process) | ms |")
  print("|---|---|")
  for name, ms in profile:
    print(f"| {name} | {ms:.1f} |")


if __name__ == "__main__":
  main()
