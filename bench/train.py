"""Train-step benchmark of kMaX-DeepLab through the production code path (issue 5).

    python bench/train.py                          # both parts, kmax_r50_coco, configs/coco.py's recipe
    python bench/train.py --parts throughput --steps 3
    python bench/train.py --parts memory --per_device 8 16 --variants plain remat bf16 remat+bf16
    python bench/train.py --parts breakdown        # GFLOP per part, forward and backward (compile only, ~2 min)
    python bench/train.py --preset kmax_tiny --size 129 --memory_size 257 --per_device 2 --steps 2   # quick check

Everything goes through `panoptic_jax.training.train`: `create_state` (state initialised in its shardings),
`optim.make_optimizer` and `losses.LossConfig` from configs/coco.py, and `jit_train_step` compiled with
`train.compile_train_step`, exactly as the training loop does (state donated, batch sharded over the mesh, the
step's XLA options).

Part 1, throughput: `--size` crops (641) at global batch `--batch` (2) from `panoptic_jax.data.pipeline` reading a
synthetic dataset written to a temporary folder (rendered at --render_size, then the COCO recipe's resize-to-crop and
scale augmentation). Batches are read before timing, so the figures are the step alone. Reported: compile time,
median seconds per step over `--steps` steps after one warm-up step, images/s, GFLOP per step from the compiled
executable's cost_analysis(), achieved GFLOP/s as a fraction of a 2048^2 float32 matmul measured right after each step
(and of the chip's nominal dense bf16 peak on a GPU / TPU), the program's memory_analysis() and the process's peak
RSS, next to the PyTorch port's figures on the same kind of machine. The comparison with the port is made at equal
matmul rates: each step's time is scaled by the matmul rate beside it over the port's (`common.seconds_at_rate`),
since this shared machine's speed drifts by up to 30% within minutes.

Part 2, memory: the COCO recipe (`--memory_size` 1281 crops, `--per_device` images per device) is compiled but not
run; arguments are ShapeDtypeStructs (state and batch), so nothing of batch size is materialised. Reported per
variant (plain, remat, bf16, remat+bf16): memory_analysis() per device (arguments + outputs - aliased + temp) and the
compile time. This is the figure DeepLab2 users could not fit (deeplab2 #168: 32 images per A100-80GB).
CPU buffer assignment differs from a GPU's (fusion, no cuDNN workspaces): treat CPU figures as estimates.

Part 3, breakdown: where the train step's FLOPs go. Each part of the step (backbone, pixel decoder, kMaX decoder with
its 6 auxiliary predictors and their resizing, auxiliary semantic head, all losses with the matching) is compiled on
its own at `--size` and global batch `--batch` with abstract arguments (nothing runs): GFLOP of its forward and of its
forward + backward (gradients of its parameters and of its inputs, as the step needs them; not of the image), next
to the whole step. The parts add up to the step up to the optimizer update and fusion across part boundaries.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from panoptic_jax import cli  # noqa: E402
from panoptic_jax.data import pipeline, synthetic  # noqa: E402
from panoptic_jax.data.dataset import Dataset  # noqa: E402
from panoptic_jax.model import kmax_deeplab  # noqa: E402
from panoptic_jax.training import losses, optim, sharding, train  # noqa: E402

VARIANTS = {"plain": ("float32", False), "remat": ("float32", True), "bf16": ("bfloat16", False),
            "remat+bf16": ("bfloat16", True)}
# The authors' PyTorch port on the same kind of machine (kmax_r50_coco, 641x641, batch 2, float32).
PYTORCH_PORT = {"s_per_step": 17.8, "images_per_s": 0.112, "gflop": 1275.0, "fraction_of_matmul": 0.38,
                "peak_gb": 11.5}
# Its 2048^2 float32 matmul rate: 1,275 GFLOP in 17.8 s were about 38% of it.
PORT_MATMUL_RATE = PYTORCH_PORT["gflop"] / PYTORCH_PORT["s_per_step"] / PYTORCH_PORT["fraction_of_matmul"]


def load_config(path: pathlib.Path) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def recipe(base: ml_collections.ConfigDict, preset: str, size: int, batch: int, variant: str
           ) -> ml_collections.ConfigDict:
  """The config's recipe at another crop size / global batch / dtype / remat (what the --config.* flags set)."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.model.preset = preset
  config.model.dtype, config.model.remat = VARIANTS[variant]
  config.input.crop_size = (size, size)
  config.input.num_workers = 0
  config.train.batch_size = batch
  return config


def make_step(config: ml_collections.ConfigDict, num_classes: int, mesh: jax.sharding.Mesh):
  """(jitted train step, model definition, state, state shardings) as `train.run` builds them."""
  tx, schedule = optim.make_optimizer(total_steps=config.train.steps, **config.optim)
  model_def, state, shardings = train.create_state(config, num_classes, mesh, tx)
  step_fn = train.jit_train_step(model_def, tx, schedule, losses.LossConfig(**config.loss), shardings, mesh)
  return step_fn, model_def, state, shardings


def batch_spec(batch: int, size: int, arch: kmax_deeplab.KMaXConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shapes and dtypes of a train batch (pipeline.py's contract) at a square crop."""
  out = (size - 1) // arch.output_stride + 1
  return {"image": ((batch, size, size, 3), np.uint8), "panoptic": ((batch, size, size), np.int32),
          "semantic": ((batch, out, out), np.int32), "slot_ids": ((batch, out, out), np.int32),
          "slot_classes": ((batch, arch.num_slots), np.int32), "dropped_segments": ((batch,), np.int32),
          "valid": ((batch,), np.bool_), "index": ((batch,), np.int32)}


def abstract_batch(spec: dict, mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
          for k, (shape, dtype) in spec.items()}


def _gb(x: float) -> str:
  return f"{x:.2f}"


# ----------------------------------------------------------------------------------------------------------------------
# Part 1: throughput


def read_batches(config: ml_collections.ConfigDict, arch: kmax_deeplab.KMaXConfig, count: int, render_size: int,
                 workdir: str) -> list[dict[str, np.ndarray]]:
  """`count` train batches from the real pipeline over a small synthetic dataset written to `workdir`."""
  synthetic.generate(workdir, num_train=max(4, config.train.batch_size), num_val=0, seed=config.seed,
                     height=render_size, width=render_size, num_workers=0, progress=False)
  iterator = pipeline.make_train_iterator(Dataset.open(str(pathlib.Path(workdir) / "train")),
                                          train.pipeline_config(config, arch))
  batches = [next(iterator) for _ in range(count)]
  if hasattr(iterator, "close"):
    iterator.close()
  return batches


def check_batch(batch: dict[str, np.ndarray], spec: dict) -> None:
  """The pipeline's batch must match the contract that part 2's abstract batches are built from."""
  found = {k: (v.shape, v.dtype) for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}
  expected = {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}
  if found != expected:
    raise AssertionError(f"pipeline batch {found} does not match batch_spec {expected}")


def bench_throughput(base: ml_collections.ConfigDict, args: argparse.Namespace, variant: str,
                     workdir: str) -> dict[str, Any]:
  mesh = sharding.make_mesh(base.mesh.data, base.mesh.fsdp)
  config = recipe(base, args.preset, args.size, args.batch, variant)
  step_fn, model_def, state, _ = make_step(config, args.num_classes, mesh)
  local = read_batches(config, model_def.arch, args.steps + 1, args.render_size, workdir)
  check_batch(local[0], batch_spec(args.batch // jax.process_count(), args.size, model_def.arch))
  batches = [sharding.global_batch(b, mesh) for b in local]
  base_rng = jax.random.key(config.seed)
  t = time.perf_counter()
  compiled = train.compile_train_step(step_fn, mesh, state, batches[0], jax.random.fold_in(base_rng, 0), name="bench")
  compile_s = time.perf_counter() - t
  gflop, memory = common.compiled_gflop(compiled), common.compiled_memory_gb(compiled)
  times, rates, losses_seen = [], [], []
  for step, batch in enumerate(batches):
    t = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.fold_in(base_rng, step))
    jax.block_until_ready((state, metrics))
    if step:  # Step 0 is the warm-up.
      times.append(time.perf_counter() - t)
      rates.append(common.spot_matmul_rate())
    losses_seen.append(float(metrics["loss"]))
  sec, rate = float(np.median(times)), float(np.median(rates))
  res = {"variant": variant, "size": args.size, "batch": args.batch, "compile_s": compile_s, "s_per_step": sec,
         "s_per_step_all": times, "matmul_rates": rates, "matmul_rate": rate,
         "s_per_step_at_port_rate": common.seconds_at_rate(times, rates, PORT_MATMUL_RATE),
         "images_per_s": args.batch / sec, "gflop": gflop, "gflop_per_s": gflop / sec,
         "fraction_of_matmul": gflop / sec / rate, "memory_gb": memory, "peak_rss_gb": common.peak_rss_gb(),
         "losses": losses_seen, "load_average": common.load_average()}
  peak = common.nominal_peak_tflops()
  if peak:
    res["fraction_of_nominal_peak"] = gflop / sec / (peak * 1e3 * jax.device_count())
  return res


def throughput_table(results: list[dict], compare_with_port: bool) -> str:
  peak = common.nominal_peak_tflops()
  columns = ["implementation", "variant", "compile s", "s/step (each step)", "img/s", "GFLOP/step", "GFLOP/s",
             "matmul GFLOP/s beside the steps", "% of matmul",
             f"s/step at the port's matmul rate ({PORT_MATMUL_RATE:.0f})", "vs the port"]
  columns += [f"% of nominal bf16 peak ({peak:.0f} TFLOP/s)"] if peak else []
  columns += ["program GB (memory_analysis)", "peak RSS GB", "loss first -> last", "load avg"]
  rows = []
  for r in results:
    row = ["panoptic_jax", r["variant"], f"{r['compile_s']:.0f}",
           f"{r['s_per_step']:.2f} ({', '.join(f'{t:.2f}' for t in r['s_per_step_all'])})", f"{r['images_per_s']:.3f}",
           f"{r['gflop']:.0f}", f"{r['gflop_per_s']:.1f}",
           common.median_and_range(r["matmul_rates"]),
           f"{100 * r['fraction_of_matmul']:.0f}%", f"{r['s_per_step_at_port_rate']:.2f}",
           f"{PYTORCH_PORT['s_per_step'] / r['s_per_step_at_port_rate']:.2f}x"
           if compare_with_port and r["variant"] == "plain" else "-"]
    row += [f"{100 * r['fraction_of_nominal_peak']:.1f}%"] if peak else []
    row += [_gb(r["memory_gb"]["peak"]), _gb(r["peak_rss_gb"]), f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}",
            f"{r['load_average']:.2f}"]
    rows.append(row)
  p = PYTORCH_PORT
  rows.append(["kMaX PyTorch port (same machine kind)", "plain", "-", f"{p['s_per_step']:.1f}",
               f"{p['images_per_s']:.3f}", f"{p['gflop']:.0f}", f"{p['gflop'] / p['s_per_step']:.1f}",
               f"~{PORT_MATMUL_RATE:.0f}", f"~{100 * p['fraction_of_matmul']:.0f}%", f"{p['s_per_step']:.1f}", "1x"]
              + (["-"] if peak else []) + ["-", f"{p['peak_gb']:.1f}", "-", "-"])
  return common.markdown_table(columns, rows)


# ----------------------------------------------------------------------------------------------------------------------
# Part 2: memory of the full recipe (compile only)


def abstract_state(state: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def bench_memory(base: ml_collections.ConfigDict, args: argparse.Namespace) -> list[dict[str, Any]]:
  mesh = sharding.make_mesh(base.mesh.data, base.mesh.fsdp)
  num_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  results = []
  for variant in args.variants:
    step_fn, model_def, state, _ = make_step(recipe(base, args.preset, args.memory_size, 1, variant),
                                             args.num_classes, mesh)  # The step does not depend on the batch size.
    state = abstract_state(state)  # Only shapes and shardings from here on; the real state is freed.
    for per_device in args.per_device:
      config = recipe(base, args.preset, args.memory_size, per_device * num_shards, variant)
      batch = abstract_batch(batch_spec(config.train.batch_size, args.memory_size, model_def.arch), mesh)
      t = time.perf_counter()
      compiled = train.compile_train_step(step_fn, mesh, state, batch, jax.random.key(0), name="bench_memory")
      compile_s = time.perf_counter() - t
      results.append({"variant": variant, "per_device": per_device, "size": args.memory_size,
                      "global_batch": config.train.batch_size, "compile_s": compile_s,
                      "memory_gb": common.compiled_memory_gb(compiled), "gflop": common.compiled_gflop(compiled),
                      "peak_rss_gb": common.peak_rss_gb(), "load_average": common.load_average()})
      print(json.dumps(results[-1]), flush=True)
      del compiled
  return results


def memory_table(results: list[dict]) -> str:
  columns = ["variant", "images/device", "crop", "peak GB/device", "temp GB", "arguments GB", "outputs GB",
             "aliased GB", "GFLOP/step/device", "compile s", "process peak RSS GB", "load avg"]
  rows = [[r["variant"], r["per_device"], f"{r['size']}x{r['size']}", _gb(r["memory_gb"]["peak"]),
           _gb(r["memory_gb"]["temp"]), _gb(r["memory_gb"]["arguments"]), _gb(r["memory_gb"]["outputs"]),
           _gb(r["memory_gb"]["aliased"]), f"{r['gflop']:.0f}", f"{r['compile_s']:.0f}", _gb(r["peak_rss_gb"]),
           f"{r['load_average']:.2f}"] for r in results]
  return common.markdown_table(columns, rows)


# ----------------------------------------------------------------------------------------------------------------------
# Part 3: GFLOP per part (compile only)


def part_gflop(module: nnx.Module, fn, inputs: Any, input_grads: bool = True) -> tuple[float, float]:
  """(forward, forward + backward) GFLOP of `fn(module, inputs)` in train mode, from XLA's cost analysis.

  The backward takes the gradients of the module's parameters and, with `input_grads`, of `inputs` (what
  backpropagation through the rest of the step needs), for a cotangent shaped like the output.
  """
  graph, params, rest = nnx.split(module, nnx.Param, ...)

  def forward(p, r, x):
    return fn(nnx.merge(graph, p, r, copy=True), x)

  def backward(p, r, x, cotangent):
    grads = jax.vjp(lambda p, x: forward(p, r, x), p, x)[1](cotangent)
    return grads if input_grads else grads[0]

  out = jax.eval_shape(forward, params, rest, inputs)
  gflop = lambda f, *a: common.compiled_gflop(jax.jit(f).lower(*a).compile())
  return gflop(forward, params, rest, inputs), gflop(backward, params, rest, inputs, out)


def bench_breakdown(base: ml_collections.ConfigDict, args: argparse.Namespace) -> list[dict[str, Any]]:
  """GFLOP of each part of the train step and of the whole step at --size, global batch --batch."""
  model = kmax_deeplab.abstract_model(args.preset, args.num_classes)
  model.train()
  graph, state = nnx.split(model)
  image = jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32)
  feats = jax.eval_shape(lambda s, x: nnx.merge(graph, s).backbone(x), state, image)
  panoptic, multi_scale = jax.eval_shape(lambda s, f: nnx.merge(graph, s).pixel_decoder(f), state, feats)
  outputs = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, image)
  batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype)
           in batch_spec(args.batch, args.size, model.cfg).items()}
  loss_config = losses.LossConfig(**base.loss)
  loss_fn = lambda o, b: losses.kmax_losses(o, b, loss_config, jax.random.key(0))[0]
  parts = [("backbone", model.backbone, lambda m, x: m(x), image, False),
           ("pixel decoder", model.pixel_decoder, lambda m, f: m(f), feats, True),
           ("kMaX decoder + 6 aux predictors + heads", model.transformer_decoder, lambda m, a: m(*a),
            (multi_scale, panoptic), True)]
  if model.semantic_head is not None:
    parts.append(("auxiliary semantic head", model.semantic_head, lambda m, f: m(f), feats, True))
  results = []
  for name, module, fn, inputs, input_grads in parts:
    forward, total = part_gflop(module, fn, inputs, input_grads)
    results.append({"part": name, "forward": forward, "forward_backward": total})
    print(json.dumps(results[-1]), flush=True)
  gflop = lambda f, *a: common.compiled_gflop(jax.jit(f).lower(*a).compile())
  results.append({"part": "losses + matching (7 outputs)", "forward": gflop(loss_fn, outputs, batch),
                  "forward_backward": gflop(jax.grad(loss_fn), outputs, batch)})
  mesh = sharding.make_mesh(base.mesh.data, base.mesh.fsdp)
  step_fn, model_def, step_state, _ = make_step(recipe(base, args.preset, args.size, args.batch, "plain"),
                                                args.num_classes, mesh)
  compiled = train.compile_train_step(step_fn, mesh, abstract_state(step_state), abstract_batch(
      batch_spec(args.batch, args.size, model_def.arch), mesh), jax.random.key(0), name="bench_breakdown")
  results.append({"part": "whole train step (with the optimizer)", "forward": float("nan"),
                  "forward_backward": common.compiled_gflop(compiled)})
  return results


def breakdown_table(results: list[dict]) -> str:
  columns = ["part", "forward GFLOP", "backward GFLOP", "forward + backward GFLOP", "backward / forward"]
  rows = []
  for r in results:
    f, fb = r["forward"], r["forward_backward"]
    rows.append([r["part"], "-" if np.isnan(f) else f"{f:.1f}", "-" if np.isnan(f) else f"{fb - f:.1f}",
                 f"{fb:.1f}", "-" if np.isnan(f) else f"{fb / f:.2f}"])
  return common.markdown_table(columns, rows)


# ----------------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=str(REPO / "configs" / "coco.py"), help="config file (get_config())")
  p.add_argument("--preset", default=None, help="model preset (default: the config's)")
  p.add_argument("--num_classes", type=int, default=None, help="default: the preset's dataset (COCO 133)")
  p.add_argument("--parts", nargs="+", choices=("throughput", "memory", "breakdown"),
                 default=["throughput", "memory"])
  p.add_argument("--size", type=int, default=641, help="part 1 and 3 crop size (square)")
  p.add_argument("--batch", type=int, default=2, help="part 1 and 3 global batch")
  p.add_argument("--steps", type=int, default=2, help="part 1 timed steps after the warm-up step")
  p.add_argument("--render_size", type=int, default=640, help="side of the synthetic images (even)")
  p.add_argument("--throughput_variants", nargs="+", choices=tuple(VARIANTS), default=["plain"])
  p.add_argument("--memory_size", type=int, default=1281, help="part 2 crop size (square)")
  p.add_argument("--per_device", type=int, nargs="+", default=[8], help="part 2 images per device")
  p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS), help="part 2 variants")
  p.add_argument("--out", default=None, help="JSON file for the results")
  args = p.parse_args(argv)
  if args.steps < 1:
    p.error("--steps must be >= 1")
  base = load_config(pathlib.Path(args.config))
  args.preset = args.preset or base.model.preset
  if args.num_classes is None:
    args.num_classes = next((n for d, n in kmax_deeplab.DATASET_CLASSES.items() if d in args.preset), 133)
  results: dict[str, Any] = {"preset": args.preset, "num_classes": args.num_classes,
                             "device": common.device_description(), "argv": sys.argv}
  if "throughput" in args.parts:
    head = common.header(f"Train step, {args.preset}, {args.size}x{args.size}, global batch {args.batch}")
    port = (args.preset, args.num_classes, args.size, args.batch) == ("kmax_r50_coco", 133, 641, 2)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as workdir:
      results["throughput"] = [bench_throughput(base, args, v, workdir) for v in args.throughput_variants]
    print(f"\n{head}\n{throughput_table(results['throughput'], port)}\n", flush=True)
  if "memory" in args.parts:
    head = common.header(f"Train step memory per device, {args.preset}, {args.memory_size}x{args.memory_size} "
                         "(compiled, not run)")
    results["memory"] = bench_memory(base, args)
    print(f"\n{head}\n{memory_table(results['memory'])}\n", flush=True)
  if "breakdown" in args.parts:
    head = common.header(f"Train step GFLOP per part, {args.preset}, {args.size}x{args.size}, global batch "
                         f"{args.batch} (compiled, not run)")
    results["breakdown"] = bench_breakdown(base, args)
    print(f"\n{head}\n{breakdown_table(results['breakdown'])}\n", flush=True)
  results["load_average_end"] = common.load_average()
  print(f"load average (1 min) at the end: {results['load_average_end']:.2f}; process peak RSS "
        f"{common.peak_rss_gb():.2f} GB", flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1, default=str) + "\n")
  return 0


if __name__ == "__main__":
  cli.run(main, malloc_tunables=True, inline_dispatch=True)  # As the training entry point runs.
