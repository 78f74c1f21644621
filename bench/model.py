"""Model benchmark: kMaX-DeepLab parameter counts and inference images/s on the local device(s).

    python bench/model.py                                   # kmax_r50_coco: parameters, inference 641 + 1281
    python bench/model.py --sizes 641 --iters 1             # shorter
    python bench/model.py --preset kmax_tiny --sizes 129 --iters 3     # quick check

The train step (throughput, MFU, memory of the full recipe) is measured by bench/train.py through the production
training code.

Parameters: per part (backbone, pixel decoder, transformer decoder + heads, auxiliary semantic head), counted on the
abstract model (nothing materialised); for kmax_r50_coco next to the authors' PyTorch port's exact counts.
Inference: jitted forward (eval mode) + the mask-wise merge of `panoptic_jax/inference/postprocess.py` at the input
size, batch 1, returning what the evaluation uses (panoptic map, segment scores; not the per-pixel class
probabilities). Reported: compile time, median seconds per image over `--iters` calls after one warm-up call,
images/s, GFLOP per image from XLA's cost_analysis of the compiled program, achieved GFLOP/s against a 2048^2 float32
matmul measured right after each call, the compiled program's memory_analysis and the process's peak resident memory.
The comparison with the PyTorch port's published seconds is made at equal matmul rates: each call's time is scaled
by the matmul rate beside it over the port's (`common.seconds_at_rate`), since this shared machine's speed drifts by up
to 30% within minutes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from panoptic_jax import cli  # noqa: E402
from panoptic_jax.inference import postprocess as pp  # noqa: E402
from panoptic_jax.model.kmax_deeplab import (abstract_model, build_model, default_num_classes,  # noqa: E402
                                             param_breakdown)

# The authors' PyTorch port, kmax_r50_coco (133 + 1 classes): docs/kmax.md, section 4.
PYTORCH_PORT_R50_COCO = {"backbone": 23_508_032, "pixel_decoder": 21_151_040,
                         "transformer_decoder_and_heads": 11_921_048, "aux_semantic_head": 15_856_742,
                         "total_without_aux": 56_580_120, "total_with_aux": 72_436_862}


# The port's inference, measured with its own code on this kind of machine (issue 3): seconds per image, and its
# 2048^2 float32 matmul rate derived from "148.5 GFLOP, about 45% of that rate" in 1.77 s.
PYTORCH_PORT_INFERENCE_S = {641: 1.77, 1281: 9.0}
PYTORCH_PORT_MATMUL_RATE = 148.5 / 1.77 / 0.45


def time_calls(fn, args, iters: int) -> tuple[list[float], list[float]]:
  """Seconds of each of `iters` calls after one warm-up call, and the matmul rate measured right after each."""
  jax.block_until_ready(fn(*args))
  times, rates = [], []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
    rates.append(common.spot_matmul_rate())
  return times, rates


def param_table(preset: str, num_classes: int) -> tuple[dict, str]:
  counts = param_breakdown(abstract_model(preset, num_classes))
  reference = PYTORCH_PORT_R50_COCO if (preset, num_classes) == ("kmax_r50_coco", 133) else None
  columns = ["part", "panoptic_jax"] + (["PyTorch port", "difference"] if reference else [])
  rows = [[part, f"{n:,}"] + ([f"{reference[part]:,}", f"{n - reference[part]:+,}"] if reference else [])
          for part, n in counts.items()]
  return counts, common.markdown_table(columns, rows)


def bench_inference(preset: str, num_classes: int, size: int, iters: int, dtype: str, post: bool) -> dict:
  model = build_model(preset, num_classes, rngs=nnx.Rngs(0), dtype=dtype)
  model.eval()
  graphdef, state = nnx.split(model)
  is_thing = jnp.arange(num_classes) < 80
  cfg = pp.get_preset("coco")

  def infer(state, images):
    out = nnx.merge(graphdef, state)(images)
    if not post:
      return out["mask_logits"], out["class_logits"]
    merged = pp.postprocess(out["mask_logits"], out["class_logits"], images.shape[1:3], is_thing, cfg, 256)
    # The panoptic map and segment scores, as the evaluation keeps them; per-pixel class probabilities (15 GFLOP at
    # 641) are computed only by callers that use them.
    return {k: v for k, v in merged.items() if k != "semantic_probs"}

  images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (1, size, size, 3)).astype(np.uint8))
  t = time.perf_counter()
  compiled = jax.jit(infer).lower(state, images).compile()
  compile_s = time.perf_counter() - t
  times, rates = time_calls(compiled, (state, images), iters)
  sec = float(np.median(times))
  gflop = common.compiled_gflop(compiled)
  return {"size": size, "batch": 1, "postprocess": post, "compile_s": compile_s, "s_per_image": sec,
          "s_per_image_all": times, "matmul_rates": rates, "matmul_rate": float(np.median(rates)),
          "s_per_image_at_port_rate": common.seconds_at_rate(times, rates, PYTORCH_PORT_MATMUL_RATE),
          "images_per_s": 1.0 / sec, "gflop": gflop, "gflop_per_s": gflop / sec,
          "memory_gb": common.compiled_memory_gb(compiled), "peak_rss_gb": common.peak_rss_gb(),
          "load_average": common.load_average()}


def inference_table(results: list[dict], compare_with_port: bool) -> str:
  columns = ["input", "work", "compile s", "s/img (each call)", "img/s", "GFLOP/img", "GFLOP/s",
             "matmul GFLOP/s beside the calls", "% of matmul",
             f"s/img at the port's matmul rate ({PYTORCH_PORT_MATMUL_RATE:.0f})", "vs the port",
             "program GB (memory_analysis)", "peak RSS GB", "load avg"]
  rows = []
  for r in results:
    port = PYTORCH_PORT_INFERENCE_S.get(r["size"]) if r["postprocess"] and compare_with_port else None
    each = ", ".join(f"{t:.2f}" for t in r["s_per_image_all"])
    rows.append([f"{r['size']}x{r['size']} b1", "forward + post-processing" if r["postprocess"] else "forward",
                 f"{r['compile_s']:.0f}", f"{r['s_per_image']:.2f} ({each})",
                 f"{r['images_per_s']:.3f}", f"{r['gflop']:.0f}", f"{r['gflop_per_s']:.1f}",
                 common.median_and_range(r["matmul_rates"]),
                 f"{100 * r['gflop_per_s'] / r['matmul_rate']:.0f}%", f"{r['s_per_image_at_port_rate']:.2f}",
                 f"{port / r['s_per_image_at_port_rate']:.2f}x" if port else "-",
                 f"{r['memory_gb']['peak']:.2f}", f"{r['peak_rss_gb']:.2f}", f"{r['load_average']:.2f}"])
  return common.markdown_table(columns, rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="kmax_r50_coco")
  p.add_argument("--num_classes", type=int, default=None)
  p.add_argument("--sizes", type=int, nargs="*", default=[641, 1281], help="inference sizes (square)")
  p.add_argument("--iters", type=int, default=3, help="timed calls per size after one warm-up call")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--no_post", action="store_true", help="time the forward pass only")
  p.add_argument("--out", default=None, help="JSON file for the results")
  args = p.parse_args(argv)
  num_classes = args.num_classes or default_num_classes(args.preset)
  results = {"preset": args.preset, "num_classes": num_classes, "dtype": args.dtype,
             "device": common.device_description(), "argv": sys.argv}
  head = common.header(f"Parameters, {args.preset} ({num_classes} + 1 classes)")
  results["parameters"], table = param_table(args.preset, num_classes)
  print(f"\n{head}\n{table}\n", flush=True)
  if args.sizes:
    head = common.header(f"Inference, {args.preset}, {args.dtype}")
    port = (args.preset, num_classes, args.dtype) == ("kmax_r50_coco", 133, "float32")  # The port's measurement.
    results["inference"] = [bench_inference(args.preset, num_classes, size, args.iters, args.dtype, not args.no_post)
                            for size in args.sizes]
    print(f"\n{head}\n{inference_table(results['inference'], port)}\n", flush=True)
  results["load_average_end"] = common.load_average()
  print(f"load average (1 min) at the end: {results['load_average_end']:.2f}; process peak RSS "
        f"{common.peak_rss_gb():.2f} GB", flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
  return 0


if __name__ == "__main__":
  cli.run(main, malloc_tunables=True, inline_dispatch=True)  # As the training entry point runs.
