"""Evaluation from files, as whole processes: `python -m panoptic_jax.evaluate` against hotcoco's `pq_compute`.

    python bench/evaluate_cli.py                                   # 300 and 1,500 COCO-like pairs, 60 Cityscapes-like
    python bench/evaluate_cli.py --sets coco:300 --runs 3 --s3     # one set; also local against S3

Data (generated once into .cache/bench_evaluate_cli): COCO panoptic JSON + PNG folders for ground truth and
predictions, made by bench/metrics.py's `make_pair` (rectangles of random categories, crowd and void; predictions
shift, drop and relabel the GT's segments): COCO-like 480x640 with ~20 segments, Cityscapes-like 1024x2048 with ~60.
Each tool runs as a fresh process on the same files, alternately, `--runs` times; the table gives the best wall and
CPU seconds of each (the machine is shared) and their ratio. The PQ of both is checked equal. hotcoco computes PQ
only; `python -m panoptic_jax.evaluate` also computes mIoU (and AP, which these predictions, without scores, skip).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

# The environment a user's shell gives the commands (bench/metrics.py, imported below, sets JAX variables of its own).
USER_ENV = dict(os.environ)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.metrics import make_pair, write_coco  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench_evaluate_cli"
SHAPES = {"coco": (480, 640, 20), "cityscapes": (1024, 2048, 60)}
HOTCOCO = ("import contextlib, io, json, sys\n"
           "from hotcoco.panoptic import pq_compute\n"
           "with contextlib.redirect_stdout(io.StringIO()):\n"
           "  r = pq_compute(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4])\n"
           "print(json.dumps({'pq': r['All']['pq']}))\n")


def make_set(kind: str, count: int) -> dict[str, str]:
  h, w, segments = SHAPES[kind]
  root = CACHE / f"{kind}_{count}"
  if not (root / "pred.json").exists():
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pairs = [make_pair(rng, h, w, segments) for _ in range(count)]
    write_coco(root, "gt", [(p[0], p[1]) for p in pairs])
    write_coco(root, "pred", [(p[2], p[3]) for p in pairs])
  return {"gt_json": str(root / "gt.json"), "gt_folder": str(root / "gt"), "pred_json": str(root / "pred.json"),
          "pred_folder": str(root / "pred")}


def run(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
  """(wall seconds, CPU seconds of the child processes, stdout) of one fresh process."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True,
                        env=dict(USER_ENV, PYTHONPATH=str(REPO), **(env or {})))
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if done.returncode:
    raise SystemExit(f"{command[:4]} failed:\n{done.stderr[-3000:]}")
  return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.stdout


def profile(files: dict[str, str], count: int = 100) -> list[list]:
  """ms per image of each stage of `evaluate` on the first `count` images, in this process, one thread."""
  import cv2
  from PIL import Image

  from panoptic_jax.data.resampling import opencv
  from panoptic_jax.evaluation import coco_format, evaluator as evaluator_lib
  gt = evaluator_lib.open_coco_side(files["gt_json"], files["gt_folder"])
  pred = evaluator_lib.open_coco_side(files["pred_json"], files["pred_folder"], gt.coco)
  keys = gt.names[:count]
  paths = [f"{files[side + '_folder']}/{k}.png" for k in keys for side in ("gt", "pred")]
  opencv()  # One OpenCV thread, as evaluate runs it (its threads parallelise over images).
  mapping = evaluator_lib._category_mapping(gt, pred)  # pylint: disable=protected-access

  def per_image(fn) -> float:
    start = time.perf_counter()
    for item in fn():
      pass
    return 1e3 * (time.perf_counter() - start) / len(keys)

  def load_both(k):
    return evaluator_lib._load(gt, k, True, gt, None)[0], evaluator_lib._load(pred, k, False, gt, mapping)[0]  # noqa

  loaded = [load_both(k) for k in keys]
  histograms = [coco_format.segment_histogram(g, p) for g, p in loaded]
  rows = [
      ["PNG decode, Pillow (2 PNGs)", per_image(lambda: (np.asarray(Image.open(p).convert("RGB")) for p in paths))],
      ["PNG decode, OpenCV (2 PNGs)", per_image(lambda: (cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_COLOR)
                                                       for p in paths))],
      ["PNG decode, libspng (2 PNGs; the one used)", per_image(lambda: (coco_format._decode_rgb(p)  # noqa
                                                                        for p in paths))],
      ["both sides read into segment tables (decode included)", per_image(lambda: (load_both(k) for k in keys))],
      ["joint histogram of the two entry maps", per_image(lambda: (coco_format.segment_histogram(g, p)
                                                                   for g, p in loaded))],
  ]
  evaluator = evaluator_lib.Evaluator(gt.categories, gt.is_thing, gt.label_divisor)

  def add_histograms():
    for h in histograms:
      evaluator.add_histogram(h)
      yield
    evaluator.flush()
  rows.append(["PQ + confusion from the histograms (numpy, host)", per_image(add_histograms)])
  maps = [(g.panoptic, p.panoptic, g.crowd) for g, p in loaded]
  rows.append(["(in-loop path) canonical maps from the tables", per_image(
      lambda: ((g.panoptic, p.panoptic, g.crowd) for g, p in loaded))])
  for m in maps[:evaluator.batch_size]:
    evaluator.add(*m)
  evaluator.flush()  # Compiles.

  def add_maps():
    for m in maps:
      evaluator.add(*m)
      yield
    evaluator.flush()
  rows.append(["(in-loop path) checks, batching, jitted PQ + confusion on maps (both cores)", per_image(add_maps)])
  return [[name, f"{ms:.2f}"] for name, ms in rows]


def make_datasets(files: dict[str, str], root: pathlib.Path) -> tuple[str, str]:
  """The set in the project's format (crowd regions become void): (GT folder, prediction folder)."""
  from panoptic_jax.data import dataset_format as fmt
  from panoptic_jax.evaluation import evaluator as evaluator_lib
  gt = evaluator_lib.open_coco_side(files["gt_json"], files["gt_folder"])
  pred = evaluator_lib.open_coco_side(files["pred_json"], files["pred_folder"], gt.coco)
  colors = tuple((40 + 5 * k, 255 - 5 * k, 100 + 3 * k) for k in range(len(gt.categories)))
  info = fmt.DatasetInfo(tuple(gt.categories), colors, tuple(gt.is_thing))
  folders = []
  for name, side in (("gt", gt), ("pred", pred)):
    folder = root / name
    if not (folder / "metadata.yaml").exists():
      (folder / info.annotations).mkdir(parents=True, exist_ok=True)
      index = {cid: k for k, cid in enumerate(gt.category_ids)}
      for key in side.names:
        panoptic = side.coco.load(key, index, info.label_divisor, name == "gt").panoptic
        (folder / info.annotations / f"{key}.tif").write_bytes(fmt.encode_annotation(panoptic, info))
      (folder / "metadata.yaml").write_text(fmt.metadata_yaml(info))
    folders.append(str(folder))
  return folders[0], folders[1]


def s3_against_local(files: dict[str, str], root: pathlib.Path, runs: int) -> list:
  """`evaluate` of the project-format copies from a local folder and from a SeaweedFS server on loopback."""
  from tests.s3_server import start_server, stop_server
  gt, pred = make_datasets(files, root)
  server = start_server()
  try:
    fs = server.filesystem()
    fs.mkdir("bench")
    for local in (gt, pred):
      fs.put(local + "/", f"bench/{pathlib.Path(local).name}/", recursive=True)
    evaluate = [sys.executable, "-m", "panoptic_jax.evaluate"]
    s3 = evaluate + ["--gt", "s3://bench/gt", "--pred", "s3://bench/pred", "--endpoint_url", server.endpoint_url]
    commands = {"local": evaluate + ["--gt", gt, "--pred", pred], "S3": s3,
                "S3, 16 reader threads": s3 + ["--workers", "16"]}
    best: dict[str, tuple[float, float]] = {}
    for _ in range(runs):
      for name, command in commands.items():
        wall, cpu, _ = run(command, server.env())
        if name not in best or wall < best[name][0]:
          best[name] = (wall, cpu)
  finally:
    stop_server(server)
  return [[f"{name}", f"{wall:.2f} ({cpu:.2f})", f"{wall / best['local'][0]:.2f}"]
          for name, (wall, cpu) in best.items()]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sets", nargs="+", default=["coco:300", "coco:1500", "cityscapes:60"])
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--profile", action="store_true", help="also the ms per image of each stage (first set)")
  parser.add_argument("--s3", action="store_true",
                      help="also the first set in the project's format, read locally and from SeaweedFS")
  args = parser.parse_args()
  print(common.header("Evaluation from files, whole processes"))
  rows = []
  for spec in args.sets:
    kind, count = spec.split(":")
    files = make_set(kind, int(count))
    ours_cmd = [sys.executable, "-m", "panoptic_jax.evaluate", "--gt_json", files["gt_json"], "--gt_folder",
                files["gt_folder"], "--pred_json", files["pred_json"], "--pred_folder", files["pred_folder"]]
    out = pathlib.Path(tempfile.mkdtemp()) / "result.json"
    ours_cmd += ["--out", str(out)]
    hot_cmd = [sys.executable, "-c", HOTCOCO, files["gt_json"], files["pred_json"], files["gt_folder"],
               files["pred_folder"]]
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.runs):
      for name, command in (("ours", ours_cmd), ("hotcoco", hot_cmd)):
        wall, cpu, stdout = run(command)
        if name not in best or wall < best[name][0]:
          best[name] = (wall, cpu)
        if name == "hotcoco":
          hot_pq = json.loads(stdout.strip().splitlines()[-1])["pq"]
    ours_pq = json.loads(out.read_text())["panoptic"]["All"]["pq"]
    assert abs(ours_pq - hot_pq) < 1e-9, (spec, ours_pq, hot_pq)
    h, w, _ = SHAPES[kind]
    rows.append([f"{kind} {h}x{w}", count, f"{best['ours'][0]:.2f} ({best['ours'][1]:.2f})",
                 f"{best['hotcoco'][0]:.2f} ({best['hotcoco'][1]:.2f})", f"{best['ours'][0] / best['hotcoco'][0]:.2f}",
                 f"{abs(ours_pq - hot_pq):.1e}"])
  print(common.markdown_table(["set", "images", "ours: wall s (CPU s)", "hotcoco: wall s (CPU s)",
                               "wall ratio (ours / hotcoco)", "|dPQ|"], rows))
  if args.profile:
    kind, count = args.sets[0].split(":")
    print(f"\nWhere the time of one image goes ({kind}, one thread unless said):\n")
    print(common.markdown_table(["stage", "ms per image"], profile(make_set(kind, int(count)))))
  if args.s3:
    kind, count = args.sets[0].split(":")
    print(f"\nThe {kind} set of {count} images in the project's format (TIFF maps), read locally and from S3:\n")
    rows = s3_against_local(make_set(kind, int(count)), CACHE / f"{kind}_{count}_dataset", args.runs)
    print(common.markdown_table(["location", "wall s (CPU s)", "wall / local"], rows))


if __name__ == "__main__":
  main()
