"""Model benchmark: kMaX-DeepLab inference images/s and train-step throughput on the local device(s).

    python bench/model.py                                   # kmax_r50_coco: inference 641 + 1281, train 641 b2
    python bench/model.py --preset kmax_tiny --sizes 129 --train_size 129 --iters 3     # quick check

Inference = jitted forward (eval mode) + the mask-wise merge of `panoptic_jax/inference/postprocess.py` at the input
size, batch 1. Train step = forward (train mode: BN statistics, drop-path, semantic head) + `kmax_losses` on a
synthetic ground truth (blocky masks, 32 segments) + backward + AdamW update, one jitted function.

Reported: compile time, seconds per step, images/s, FLOPs per step from XLA's `cost_analysis` of the compiled
program, achieved FLOP/s against a 2048^2 float32 matmul measured in the same run, the compiled program's memory
(`memory_analysis`) and the process's peak resident memory (`ru_maxrss`). Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from panoptic_jax.inference import postprocess as pp  # noqa: E402
from panoptic_jax.model.kmax_deeplab import DATASET_CLASSES, abstract_model, build_model, get_config  # noqa: E402
from panoptic_jax.training.losses import LossConfig, kmax_losses  # noqa: E402


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux: KiB


def matmul_rate(n: int = 2048, reps: int = 10) -> float:
  """Achieved float32 GFLOP/s of an n x n matmul (the machine's practical peak for this ratio)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - t) / reps)
  return 2 * n**3 / best / 1e9


def compiled_stats(compiled) -> dict:
  stats = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    stats["gflop"] = float(cost.get("flops", float("nan"))) / 1e9
  except Exception as e:  # noqa: BLE001 - the backend may not implement it
    stats["gflop"] = float("nan")
    stats["cost_analysis_error"] = repr(e)
  try:
    mem = compiled.memory_analysis()
    stats["program_memory_gb"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
                                  - mem.alias_size_in_bytes) / 2**30
    stats["temp_memory_gb"] = mem.temp_size_in_bytes / 2**30
  except Exception as e:  # noqa: BLE001
    stats["memory_analysis_error"] = repr(e)
  return stats


def time_calls(fn, args, iters: int) -> float:
  """Median seconds per call after one warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def synthetic_batch(batch: int, size: int, out_hw: tuple[int, int], num_classes: int, segments: int = 32,
                    slots: int = 128, seed: int = 0) -> dict:
  """Blocky ground truth at the output stride: a grid of `segments` rectangles, a few void pixels."""
  rs = np.random.RandomState(seed)
  segments = min(segments, slots)
  h, w = out_hw
  side = int(np.ceil(np.sqrt(segments)))
  ys = np.minimum(np.arange(h) * side // h, side - 1)
  xs = np.minimum(np.arange(w) * side // w, side - 1)
  grid = (ys[:, None] * side + xs[None, :]) % segments
  slot_ids = np.broadcast_to(grid, (batch, h, w)).astype(np.int32).copy()
  slot_ids[:, :2, :] = -1
  slot_classes = np.full((batch, slots), -1, np.int32)
  slot_classes[:, :segments] = rs.randint(0, num_classes, (batch, segments))
  return {"image": rs.randint(0, 256, (batch, size, size, 3)).astype(np.uint8),
          "slot_ids": slot_ids, "slot_classes": slot_classes, "valid": np.ones((batch,), bool)}


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
    return pp.postprocess(out["mask_logits"], out["class_logits"], images.shape[1:3], is_thing, cfg, 256)

  images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (1, size, size, 3)).astype(np.uint8))
  t = time.perf_counter()
  compiled = jax.jit(infer).lower(state, images).compile()
  compile_s = time.perf_counter() - t
  sec = time_calls(compiled, (state, images), iters)
  res = {"size": size, "batch": 1, "postprocess": post, "compile_s": compile_s, "s_per_step": sec,
         "images_per_s": 1.0 / sec, **compiled_stats(compiled)}
  res["gflop_per_s"] = res["gflop"] / sec
  return res


def bench_train(preset: str, num_classes: int, size: int, batch: int, iters: int, dtype: str, remat: bool) -> dict:
  model = build_model(preset, num_classes, rngs=nnx.Rngs(0), dtype=dtype, remat=remat)
  model.train()
  tx = optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-7, weight_decay=0.05)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)
  weights = LossConfig()
  os_ = get_config(preset).output_stride
  out_hw = ((size - 1) // os_ + 1,) * 2
  nb = synthetic_batch(batch, size, out_hw, num_classes, slots=get_config(preset).num_slots)
  data = {k: jnp.asarray(v) for k, v in nb.items()}

  def step(params, rest, opt_state, data, rng):
    model = nnx.merge(graphdef, params, rest)

    def loss_fn(model):
      total, _ = kmax_losses(model(data["image"]), data, weights, rng)
      return total

    loss, grads = nnx.value_and_grad(loss_fn)(model)       # gradients w.r.t. nnx.Param; BN stats updated
    grads = nnx.state(grads, nnx.Param)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), nnx.state(model, nnx.Not(nnx.Param)), opt_state, loss

  rng = jax.random.key(0)
  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(params, rest, opt_state, data, rng).compile()
  compile_s = time.perf_counter() - t
  state = [params, rest, opt_state]

  def run():
    state[0], state[1], state[2], loss = compiled(state[0], state[1], state[2], data, rng)
    return loss

  loss0 = float(run())
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    loss = run()
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  sec = float(np.median(times))
  res = {"size": size, "batch": batch, "remat": remat, "compile_s": compile_s, "s_per_step": sec,
         "images_per_s": batch / sec, "loss_first": loss0, "loss_last": float(loss), **compiled_stats(compiled)}
  res["gflop_per_s"] = res["gflop"] / sec
  return res


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="kmax_r50_coco")
  p.add_argument("--num_classes", type=int, default=None)
  p.add_argument("--sizes", type=int, nargs="*", default=[641, 1281], help="inference sizes (square)")
  p.add_argument("--train_size", type=int, default=641)
  p.add_argument("--train_batch", type=int, default=2)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--remat", action="store_true")
  p.add_argument("--no_post", action="store_true", help="time the forward pass only")
  p.add_argument("--skip_train", action="store_true")
  p.add_argument("--out", default=None, help="JSON file for the results")
  args = p.parse_args(argv)
  num_classes = args.num_classes or next((n for d, n in DATASET_CLASSES.items() if d in args.preset), 133)
  results = {"preset": args.preset, "num_classes": num_classes, "dtype": args.dtype,
             "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}", "cpu_count": os.cpu_count(),
             "load_avg_start": os.getloadavg()[0]}
  rate = matmul_rate()
  results["matmul_2048_f32_gflop_per_s"] = rate
  print(f"device {results['device']}; matmul 2048^2 f32: {rate:.1f} GFLOP/s", flush=True)
  results["inference"] = []
  for size in args.sizes:
    r = bench_inference(args.preset, num_classes, size, args.iters, args.dtype, not args.no_post)
    r["fraction_of_matmul"] = r["gflop_per_s"] / rate
    results["inference"].append(r)
    print(f"inference {size}x{size} b1 ({'forward + post-processing' if r['postprocess'] else 'forward'}): "
          f"{r['s_per_step']:.2f} s/img, {r['images_per_s']:.3f} img/s, {r['gflop']:.0f} GFLOP, "
          f"{r['gflop_per_s']:.1f} GFLOP/s ({100 * r['fraction_of_matmul']:.0f}% of matmul), "
          f"compile {r['compile_s']:.1f} s, program memory {r.get('program_memory_gb', float('nan')):.2f} GB, "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
  if not args.skip_train:
    r = bench_train(args.preset, num_classes, args.train_size, args.train_batch, args.iters, args.dtype, args.remat)
    r["fraction_of_matmul"] = r["gflop_per_s"] / rate
    results["train"] = r
    print(f"train step {args.train_size}x{args.train_size} b{args.train_batch}: {r['s_per_step']:.2f} s/step, "
          f"{r['images_per_s']:.3f} img/s, {r['gflop']:.0f} GFLOP/step, {r['gflop_per_s']:.1f} GFLOP/s "
          f"({100 * r['fraction_of_matmul']:.0f}% of matmul), compile {r['compile_s']:.1f} s, program memory "
          f"{r.get('program_memory_gb', float('nan')):.2f} GB, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}",
          flush=True)
  results["peak_rss_gb"] = peak_rss_gb()
  results["load_avg_end"] = os.getloadavg()[0]
  print(f"peak RSS {results['peak_rss_gb']:.2f} GB; load average {results['load_avg_start']:.1f} -> "
        f"{results['load_avg_end']:.1f} on {os.cpu_count()} cores", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
