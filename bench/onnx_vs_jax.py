"""ONNX benchmark: the exported network on onnxruntime (CPU) against the jitted JAX model on CPU, same inputs.

    python bench/onnx_vs_jax.py                                        # kmax_tiny and kmax_r50_coco at 641 x 641
    python bench/onnx_vs_jax.py --presets kmax_tiny --size 129 --iters 5   # quick check

Per preset: the model (random weights, eval mode, the preset's default class count) is exported with
`panoptic_jax/inference/onnx_export.py` (symbolic batch, float32 input) and compiled with `jax.jit` as inference runs
it on CPU (XLA:CPU's kernels: Winograd convolutions and fusion barriers). Both take the same uint8-valued float32
images, batch 1. After one warm-up call each, `--iters` rounds call JAX then onnxruntime, so a drift of this shared
machine's speed affects both. Reported: export and compile seconds, median ms per image of each, the ratio
(onnxruntime / JAX: above 1, onnxruntime is slower), and the largest absolute difference of each output next to that
output's largest magnitude. onnxruntime runs with its default thread count (the machine's cores), JAX with XLA's.
(Not named bench/onnx.py: run as a script, that file would shadow the onnx package.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from panoptic_jax import cli  # noqa: E402
from panoptic_jax.inference import onnx_export  # noqa: E402
from panoptic_jax.model.kmax_deeplab import build_model, default_num_classes  # noqa: E402


def bench_preset(preset: str, size: int, iters: int, workdir: str) -> dict:
  num_classes = default_num_classes(preset)
  model = build_model(preset, num_classes, rngs=nnx.Rngs(0))
  model.eval()
  path = str(pathlib.Path(workdir) / f"{preset}_{size}.onnx")
  info = onnx_export.export_onnx(model, (size, size), path)
  session = onnx_export.load_session(path)

  graphdef, state = nnx.split(model)

  def forward(state, images):
    out = nnx.merge(graphdef, state)(images)
    return {name: out[name] for name in onnx_export.OUTPUT_NAMES}

  images_np = np.random.RandomState(0).randint(0, 256, (1, size, size, 3)).astype(np.float32)
  images = jnp.asarray(images_np)
  t = time.perf_counter()
  compiled = jax.jit(forward).lower(state, images).compile()
  compile_s = time.perf_counter() - t

  want = jax.tree.map(np.asarray, compiled(state, images))
  got = onnx_export.run_onnx(session, images_np)
  jax_s, ort_s = [], []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(compiled(state, images))
    jax_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    onnx_export.run_onnx(session, images_np)
    ort_s.append(time.perf_counter() - t)
  return {"preset": preset, "size": size, "export_s": info["seconds"],
          "onnx_mb": pathlib.Path(path).stat().st_size / 2**20, "compile_s": compile_s,
          "jax_ms": 1e3 * float(np.median(jax_s)), "ort_ms": 1e3 * float(np.median(ort_s)),
          "diff": {k: float(np.abs(got[k] - want[k]).max()) for k in onnx_export.OUTPUT_NAMES},
          "scale": {k: float(np.abs(want[k]).max()) for k in onnx_export.OUTPUT_NAMES}}


def table(results: list[dict]) -> str:
  columns = ["preset", "input", "export s", "ONNX MB", "JAX compile s", "JAX ms/img", "onnxruntime ms/img",
             "onnxruntime / JAX", "mask logits: max abs diff (max abs)", "class logits: max abs diff (max abs)"]
  rows = [[r["preset"], f"{r['size']}x{r['size']} b1", f"{r['export_s']:.0f}", f"{r['onnx_mb']:.0f}",
           f"{r['compile_s']:.0f}", f"{r['jax_ms']:.0f}", f"{r['ort_ms']:.0f}", f"{r['ort_ms'] / r['jax_ms']:.2f}",
           f"{r['diff']['mask_logits']:.1e} ({r['scale']['mask_logits']:.2f})",
           f"{r['diff']['class_logits']:.1e} ({r['scale']['class_logits']:.2f})"] for r in results]
  return common.markdown_table(columns, rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", nargs="+", default=["kmax_tiny", "kmax_r50_coco"])
  p.add_argument("--size", type=int, default=641, help="square input side (32k + 1)")
  p.add_argument("--iters", type=int, default=3, help="timed rounds after one warm-up call each")
  args = p.parse_args(argv)
  head = common.header(f"ONNX (onnxruntime, CPU) against JAX (jit, CPU), {args.size}x{args.size}")
  with tempfile.TemporaryDirectory() as workdir:
    results = []
    for preset in args.presets:
      results.append(bench_preset(preset, args.size, args.iters, workdir))
      print(f"{preset}: done", flush=True)
  print(f"\n{head}\n{table(results)}\n", flush=True)
  return 0


if __name__ == "__main__":
  cli.run(main, malloc_tunables=True, inline_dispatch=True)  # As the inference entry points run.
