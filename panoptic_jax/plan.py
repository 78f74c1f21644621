r"""Memory plan: will a recipe fit a TPU slice or a GPU, before renting one?

  python -m panoptic_jax.plan --config=configs/coco.py --topology=v5e:2x4 [--config.model.dtype=bfloat16 ...]
      [--mode=train|eval|both] [--per_chip=8] [--json=plan.json]
  python -m panoptic_jax.plan --config=configs/coco.py            # on a GPU machine: the GPUs that are there

The real train step (`training/train.py`: the same state layout, mesh, shardings, optimizer, losses and XLA options
as a run) and the real evaluation step (`training/eval_loop.py`) are lowered with `jax.ShapeDtypeStruct` arguments
carrying their shardings and compiled ahead of time; nothing of the model or the batch is materialised (the model is
traced with `nnx.eval_shape`). With `--topology` the compile is for a TPU slice with no TPU attached: libtpu
(`pip install -r requirements-tpu.txt`) compiles for the devices of `jax.experimental.topologies.get_topology_desc`.
The kernels are those the TPU runs: `ops/dispatch.py` chooses them when the step is lowered for a platform, and the
plan checks that the compiled program holds none of the XLA:CPU formulations (`cpu_ops`: the `reduce-precision`
fusion barriers of `ops/xla_cpu.py`). Without `--topology`, on a GPU host, it compiles for the local GPUs.

Reported per step and per chip (GiB = 2^30 bytes), from the compiled program (`memory_analysis`, `cost_analysis`):
  arguments    the state shard (parameters, batch statistics, Adam moments) and the batch shard
  outputs      the new state and the metrics; `aliased` of them reuse donated argument buffers
  temporaries  activations kept for the backward pass, gradients, XLA scratch
  total        arguments + outputs - aliased + temporaries, against the chip's usable HBM. The evaluation adds the
               train state it does not read (the Adam moments stay resident during a run's evaluation)
  TFLOP        per chip and step; roofline step time = max(FLOP / peak bf16 FLOP/s, bytes accessed / HBM bandwidth):
               a lower bound (collectives, input pipeline and imperfect overlap are left out)
Verdict: `fits` with at least `HEADROOM_FRACTION` of HBM free, `tight` below that (the runtime's own reservations,
prefetched input batches and fragmentation take some of it: expect out-of-memory errors), `does not fit` above HBM.

Chips (per chip; bf16 dense peak; f32 matmuls on TPU use bf16 passes at the default precision):

| chip          | HBM GiB | usable GiB | bf16 TFLOP/s | HBM GB/s | source                                                  |
|---------------|---------|------------|--------------|----------|---------------------------------------------------------|
| TPU v4        | 32      | 30.75      | 275          | 1200     | cloud.google.com/tpu/docs/v4 (system architecture)      |
| TPU v5e       | 16      | 15.75      | 197          | 819      | cloud.google.com/tpu/docs/v5e (system architecture)     |
| TPU v5p       | 96      | 95.74      | 459          | 2765     | cloud.google.com/tpu/docs/v5p (system architecture)     |
| TPU v6e       | 32      | 31.25      | 918          | 1640     | cloud.google.com/tpu/docs/v6e (system architecture)     |
| A100 80GB SXM | device  | device     | 312          | 2039     | NVIDIA A100 datasheet (bf16 tensor core, dense)         |
| H100 SXM      | device  | device     | 989          | 3350     | NVIDIA H100 datasheet (bf16 tensor core, dense)         |
| H100 PCIe     | device  | device     | 756          | 2000     | NVIDIA H100 datasheet                                   |
| H200          | device  | device     | 989          | 4800     | NVIDIA H200 datasheet                                   |
"usable" is the limit libtpu 0.0.42.1 compiles against (its out-of-memory message, "exceeds available HBM (15.75G)",
for a program too large for each chip); the verdict compares with it. A GPU's is the device's own
`memory_stats()["bytes_limit"]` (what XLA's allocator may use).

libtpu ends the compile of a program that does not fit with RESOURCE_EXHAUSTED before reporting anything; the plan
compiles with `xla_tpu_no_crash_on_oom=true`, so the compile finishes and reports what the program needs.

Topology names: `GEN:AxB[xC]` (chips along each axis, as `gcloud` and `get_topology_desc` spell it: `v5e:2x4`,
`v4:2x2x1`, `v5p:2x2x2`, `v6e:4x4`) or the accelerator types `v5e-8`, `v5litepod-8`, `v6e-8` (chips) and `v4-8`,
`v5p-8` (TensorCores: two per chip).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from panoptic_jax.errors import UserError

GIB = 2**30
HEADROOM_FRACTION = 0.1
INSTALL = "pip install -r requirements-tpu.txt"


class PlanError(UserError, ValueError):
  """A topology the plan cannot compile for (bad name, libtpu missing, no accelerator); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_gib: float | None  # Nominal; None: the device reports it (GPUs).
  usable_gib: float | None  # What XLA lets a program use (TPU: libtpu's limit; GPU: the allocator's).
  bf16_tflops: float
  hbm_gbps: float


# TPU generation -> chip; `cores_in_name`: accelerator types (`v4-8`) count TensorCores, two per chip.
TPU_CHIPS = {
    "v4": Chip("TPU v4", 32, 30.75, 275, 1200),
    "v5e": Chip("TPU v5e", 16, 15.75, 197, 819),
    "v5p": Chip("TPU v5p", 96, 95.74, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 31.25, 918, 1640),
}
_CORES_IN_NAME = {"v4", "v5p"}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e"}
_ACCELERATOR_TYPE = {"v4": "v4-{cores}", "v5e": "v5litepod-{chips}", "v5p": "v5p-{cores}", "v6e": "v6e-{chips}"}
# A slice of N chips in gcloud's 2-D / 3-D shapes (v5e / v6e: 2-D; v4 / v5p: 3-D).
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8"}
GPU_CHIPS = (  # Matched in order against the device kind.
    ("H200", Chip("NVIDIA H200", None, None, 989, 4800)),
    ("H100 PCIe", Chip("NVIDIA H100 PCIe", None, None, 756, 2000)),
    ("H100", Chip("NVIDIA H100 SXM", None, None, 989, 3350)),
    ("A100", Chip("NVIDIA A100 80GB SXM", None, None, 312, 2039)),
)


# ----------------------------------------------------------------------------------------------------------------------
# Topologies


@dataclasses.dataclass(frozen=True)
class Topology:
  generation: str  # A key of TPU_CHIPS.
  shape: str  # Chips along each axis, e.g. "2x4".

  @property
  def name(self) -> str:
    return f"{self.generation}:{self.shape}"

  @property
  def num_chips(self) -> int:
    return math.prod(int(s) for s in self.shape.split("x"))

  @property
  def accelerator_type(self) -> str:
    return _ACCELERATOR_TYPE[self.generation].format(chips=self.num_chips, cores=2 * self.num_chips)


def _bad_topology(name: str, why: str) -> PlanError:
  return PlanError(f"--topology={name}: {why}; expected GEN:AxB[xC] with GEN one of {sorted(TPU_CHIPS)} (e.g. "
                   "v5e:2x4, v4:2x2x1, v5p:2x2x2, v6e:2x2) or an accelerator type (v5e-8, v5litepod-8, v6e-8, v4-8, "
                   "v5p-8)")


def parse_topology(name: str) -> Topology:
  """`v5e:2x4`, `v5e-8`, `v5litepod-8`, `v4-8` (TensorCores), ... -> Topology. Raises PlanError."""
  text = name.strip().lower()
  match = re.fullmatch(r"([a-z0-9]+)[:=_]((?:\d+x)*\d+)", text)
  if match:
    generation, shape = _ALIASES.get(match.group(1), match.group(1)), match.group(2)
    if generation not in TPU_CHIPS:
      raise _bad_topology(name, f"unknown TPU generation {match.group(1)!r}")
    dims = len(shape.split("x"))
    want = 3 if generation in _CORES_IN_NAME else 2
    if dims != want:
      raise _bad_topology(name, f"a {generation} slice has {want} axes ({'AxBxC' if want == 3 else 'AxB'}), "
                                f"found {dims}")
    return Topology(generation, shape)
  match = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if not match:
    raise _bad_topology(name, "not a topology name")
  generation, count = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
  if generation not in TPU_CHIPS:
    raise _bad_topology(name, f"unknown TPU generation {match.group(1)!r}")
  chips = count // 2 if generation in _CORES_IN_NAME else count
  shapes = _SHAPES_3D if generation in _CORES_IN_NAME else _SHAPES_2D
  if chips not in shapes or (generation in _CORES_IN_NAME and count % 2):
    unit = "TensorCores (2 per chip)" if generation in _CORES_IN_NAME else "chips"
    valid = ", ".join(f"{generation}-{n * 2 if generation in _CORES_IN_NAME else n}" for n in shapes)
    raise _bad_topology(name, f"{count} {unit} is not a slice size: one of {valid}")
  return Topology(generation, shapes[chips])


def _no_tpu_chips() -> bool:
  from jax._src import hardware_utils  # What jax itself reads (PCI vendor ids); no public API.

  return hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0


def tpu_devices(topology: Topology) -> list[Any]:
  """Compile-only devices of `topology` (one per chip). Raises PlanError without libtpu."""
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise PlanError(f"--topology={topology.name}: compiling for a TPU without one needs libtpu, which is not "
                    f"installed; install it with `{INSTALL}` (optional, about 300 MB; the CPU programs do not use it)")
  from jax.experimental import topologies

  if _no_tpu_chips():
    # libtpu reads the slice it runs on from these (or from the TPU VM's metadata server, absent here); without
    # them it logs misleading warnings. They do not change the compile, which is for `topology` alone.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.accelerator_type)
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_WORKER_ID", "0")
    # libtpu takes /tmp/libtpu_lockfile to own the chips; a compile-only client owns none, and without this a second
    # plan (or test) on the same host fails while one runs.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4 is megacore (its two TensorCores are one JAX device) as on a v4 VM; libtpu's default splits them.
  options = {"chip_config_name": "megacore"} if topology.generation == "v4" else {}
  try:
    return list(topologies.get_topology_desc(topology.name, "tpu", **options).devices)
  except Exception as e:  # libtpu reports a bad shape as a generic runtime error.
    raise _bad_topology(topology.name, f"libtpu refused it ({str(e).splitlines()[0][:200]})") from e


def _gpu_chip(device: Any) -> Chip:
  hbm = (device.memory_stats() or {}).get("bytes_limit", 0) / GIB
  kind = device.device_kind
  for key, chip in GPU_CHIPS:
    if key.lower() in kind.lower():
      return dataclasses.replace(chip, name=kind, hbm_gib=hbm, usable_gib=hbm)
  return Chip(kind, hbm, hbm, float("nan"), float("nan"))  # Unknown GPU: memory only, no roofline.


# ----------------------------------------------------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class StepPlan:
  """One compiled step's per-chip figures (GiB, TFLOP, seconds)."""

  step: str  # "train" or "eval".
  images_per_chip: float
  arguments_gib: float
  outputs_gib: float
  aliased_gib: float
  temporaries_gib: float
  resident_gib: float  # Train state on the chip that the step does not take as an argument (eval: Adam moments).
  total_gib: float
  hbm_gib: float
  headroom_gib: float
  verdict: str
  tflop: float
  bytes_accessed_gib: float
  roofline_s: float
  bound: str  # "compute" or "memory".
  compile_s: float
  cpu_ops: int  # XLA:CPU-only formulations in the program; 0 for a TPU or GPU compile.
  suggestions: list[str]


@dataclasses.dataclass
class Plan:
  config_summary: dict[str, Any]
  target: str  # "v5e:2x4 (8 x TPU v5e, compiled without a TPU)" or the GPUs.
  num_chips: int
  chip: Chip
  mesh: dict[str, int]
  params_millions: float
  state_gib: float  # Per chip: parameters, batch statistics, optimizer state.
  steps: list[StepPlan]
  wall_s: float

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def format(self) -> str:
    c = self.config_summary
    lines = [f"Memory plan: {c['preset']} ({c['dtype']}, remat={c['remat']}), crop {c['crop'][0]}x{c['crop'][1]}, "
             f"{self.params_millions:.1f}M parameters",
             f"Target: {self.target}; mesh {self.mesh}; chip: {self.chip.hbm_gib:.1f} GiB HBM "
             f"({self.chip.usable_gib:.2f} usable), "
             f"{self.chip.bf16_tflops:g} TFLOP/s bf16, {self.chip.hbm_gbps:g} GB/s",
             f"Train state per chip: {self.state_gib:.2f} GiB", ""]
    for s in self.steps:
      batch = c["train_batch"] if s.step == "train" else c["eval_batch"]
      lines += [f"{s.step} step: global batch {batch} ({s.images_per_chip:g} images per chip), compiled in "
                f"{s.compile_s:.0f} s",
                f"  per chip   arguments {s.arguments_gib:.2f} + outputs {s.outputs_gib:.2f} - aliased "
                f"{s.aliased_gib:.2f} + temporaries {s.temporaries_gib:.2f}"
                + (f" + resident state {s.resident_gib:.2f}" if s.resident_gib else "")
                + f" = {s.total_gib:.2f} GiB of {s.hbm_gib:.2f} GiB usable HBM",
                f"  compute    {s.tflop:.2f} TFLOP per chip-step, {s.bytes_accessed_gib:.1f} GiB accessed; roofline "
                f"{s.roofline_s * 1e3:.0f} ms per step ({s.bound}-bound"
                + (f", {s.images_per_chip / s.roofline_s:.1f} images/s per chip)" if s.roofline_s > 0 else ")"),
                f"  verdict    {s.verdict.upper()}: {s.headroom_gib:+.2f} GiB headroom"
                + (f"; {s.cpu_ops} XLA:CPU-only ops in the program (not the kernels the target runs)"
                   if s.cpu_ops else "")]
      lines += [f"  try        {t}" for t in s.suggestions]
      lines.append("")
    lines.append(f"Plan made in {self.wall_s:.0f} s (figures are XLA's buffer assignment for the target; the roofline "
                 "is a lower bound on the step time).")
    return "\n".join(lines)


def _verdict(total: float, hbm: float) -> str:
  if total > hbm:
    return "does not fit"
  return "fits" if hbm - total >= HEADROOM_FRACTION * hbm else "tight"


def _suggestions(config: ml_collections.ConfigDict, step: str, per_chip: float, total: float, temp: float,
                 state_gib: float, hbm: float, fsdp_size: int, num_chips: int) -> list[str]:
  """What to change, most effective first, each with the config flag; empty when the step fits."""
  if _verdict(total, hbm) == "fits":
    return []
  out = []
  if config.model.dtype == "float32":
    out.append("--config.model.dtype=bfloat16: bf16 activations (parameters stay float32), roughly halves the "
               "temporaries")
  if step == "train" and not config.model.remat:
    out.append("--config.model.remat=True: recompute each stage's activations in the backward pass (less memory, "
               "about a third more FLOPs)")
  if fsdp_size < num_chips and state_gib > 0.05 * hbm:
    out.append(f"--config.mesh.fsdp={num_chips}: shard the {state_gib:.2f} GiB per chip of parameters and optimizer "
               f"state over the chips (down to about {state_gib / num_chips:.2f} GiB)")
  if per_chip > 1:
    half = max(per_chip // 2, 1)
    estimate = total - temp * (1 - half / per_chip)  # The temporaries scale with the images per chip.
    field = "train.batch_size" if step == "train" else "eval.batch_size"
    out.append(f"{half:g} images per chip (--config.{field}={int(half * num_chips)}, or more chips for the same "
               f"batch): about {estimate:.1f} GiB")
  if not out:
    out.append("a smaller --config.input.crop_size or a chip with more HBM")
  return out


def _state_bytes_per_chip(abstract_state: Any) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract_state))


def train_batch_spec(batch: int, crop: tuple[int, int], arch: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Shapes and dtypes of a train batch (`data/pipeline.py`'s contract, as the loop's `sharding.global_batch` keeps
  it: no host-only keys)."""
  h, w = crop
  out = ((h - 1) // arch.output_stride + 1, (w - 1) // arch.output_stride + 1)
  return {"image": ((batch, h, w, 3), np.uint8), "panoptic": ((batch, h, w), np.int32),
          "semantic": ((batch, *out), np.int32), "slot_ids": ((batch, *out), np.int32),
          "slot_classes": ((batch, arch.num_slots), np.int32), "dropped_segments": ((batch,), np.int32),
          "valid": ((batch,), np.bool_), "index": ((batch,), np.int32)}


def _cpu_ops(compiled: Any) -> int:
  """The XLA:CPU formulations' mark in a compiled program: `ops/xla_cpu.py`'s fusion barriers are reduce-precision
  ops (nothing else in the model emits one)."""
  return compiled.as_text().count(" reduce-precision(")


# libtpu ends a compile whose buffers exceed the chip's HBM with RESOURCE_EXHAUSTED, before any figure comes out;
# with this option it finishes and reports what the program needs.
_TPU_REPORT_OOM = {"xla_tpu_no_crash_on_oom": "true"}


def _step_plan(step: str, lowered: Any, options: dict[str, str] | None, per_chip: float, resident: int, chip: Chip,
               advise) -> StepPlan:
  start = time.perf_counter()
  if chip.name.startswith("TPU"):
    options = {**(options or {}), **_TPU_REPORT_OOM}
  logging.info("Compiling the %s step for %s (the COCO R50 step takes several minutes on a few cores)", step,
               chip.name)
  # A compile-only executable cannot be read back from the persistent cache (no TPU client): do not write it there.
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", cache and not chip.name.startswith("TPU"))
  try:
    compiled = lowered.compile(options)
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)
  compile_s = time.perf_counter() - start
  logging.info("Compiled the %s step in %.0f s", step, compile_s)
  hbm = chip.usable_gib
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  arguments, outputs = mem.argument_size_in_bytes / GIB, mem.output_size_in_bytes / GIB
  aliased, temp = mem.alias_size_in_bytes / GIB, mem.temp_size_in_bytes / GIB
  total = arguments + outputs - aliased + temp + resident / GIB
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  compute_s, memory_s = flops / (chip.bf16_tflops * 1e12), accessed / (chip.hbm_gbps * 1e9)
  return StepPlan(step=step, images_per_chip=per_chip, arguments_gib=arguments, outputs_gib=outputs,
                  aliased_gib=aliased, temporaries_gib=temp, resident_gib=resident / GIB, total_gib=total,
                  hbm_gib=hbm, headroom_gib=hbm - total, verdict=_verdict(total, hbm), tflop=flops / 1e12,
                  bytes_accessed_gib=accessed / GIB, roofline_s=max(compute_s, memory_s),
                  bound="compute" if compute_s >= memory_s else "memory", compile_s=compile_s,
                  cpu_ops=_cpu_ops(compiled), suggestions=advise(total, temp))


def plan(config: ml_collections.ConfigDict, topology: str | None = None, mode: str = "both",
         num_classes: int | None = None) -> Plan:
  """Compiles `config`'s train and / or eval step for `topology` (a TPU slice, no TPU needed) or, without one, for
  the local GPUs, and returns the per-chip report.

  Args:
    config: a run config (`configs/*.py` with overrides); its batch sizes are global, as in a run.
    topology: a TPU topology name (module docstring); None: the local devices, which must be GPUs.
    mode: "train", "eval" or "both".
    num_classes: classes of the dataset (without void); default: those of the dataset the preset is named after.

  Raises:
    PlanError: a bad topology, libtpu missing, or no topology and no GPU.
    ShardingError: a batch size the chips cannot split (as the run would refuse it).
  """
  from panoptic_jax import ops
  from panoptic_jax.model import kmax_deeplab
  from panoptic_jax.training import config as config_lib
  from panoptic_jax.training import eval_loop, losses, optim, sharding, train

  if mode not in ("train", "eval", "both"):
    raise PlanError(f"--mode={mode}: expected train, eval or both")
  start = time.perf_counter()
  if topology is not None:
    target = parse_topology(topology)
    devices = tpu_devices(target)
    chip = TPU_CHIPS[target.generation]
    where = f"{target.name} ({len(devices)} x {chip.name}, compiled without a TPU)"
  else:
    if jax.default_backend() != "gpu":
      raise PlanError(f"no --topology and this host's devices are {jax.default_backend()}: name a TPU topology "
                      f"(e.g. --topology=v5e:2x4; needs `{INSTALL}`) or run on a GPU host")
    devices = jax.devices()
    chip = _gpu_chip(devices[0])
    where = f"{len(devices)} x {chip.name} (this host)"
  from jax.experimental import mesh_utils

  shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, len(devices))
  # Device order along the physical topology (ICI rings), as jax.make_mesh orders a run's devices.
  mesh = sharding.make_mesh(*shape, devices=list(mesh_utils.create_device_mesh(shape, devices).flat))
  num_classes = num_classes or kmax_deeplab.default_num_classes(config.model.preset)
  tx, schedule = optim.make_optimizer(total_steps=config.train.steps, **config.optim)
  model_def, init, shardings = train.state_layout(config, num_classes, mesh, tx)
  state = init.eval_shape()
  state_bytes = _state_bytes_per_chip(state)
  arch = config_lib.model_arch(config)
  crop = tuple(config.input.crop_size)
  platform = devices[0].platform

  def advise(step: str, per_chip: float):
    return lambda total, temp: _suggestions(config, step, per_chip, total, temp, state_bytes / GIB, chip.usable_gib,
                                            mesh.shape["fsdp"], len(devices))

  steps = []
  if mode in ("train", "both"):
    sharding.check_batch_size(config.train.batch_size, mesh, "config.train.batch_size")
    spec = train_batch_spec(config.train.batch_size, crop, arch)
    batch = {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s))) for k, (s, d)
             in spec.items()}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    step_fn = train.jit_train_step(model_def, tx, schedule, losses.LossConfig(**config.loss), shardings, mesh)
    per_chip = config.train.batch_size / len(devices)
    steps.append(_step_plan("train", step_fn.lower(state, batch, rng), ops.train_step_compiler_options(platform),
                            per_chip, 0, chip, advise("train", per_chip)))
  if mode in ("eval", "both"):
    sharding.check_batch_size(config.eval.batch_size, mesh, "config.eval.batch_size")
    # The categories' kinds do not change the program's size: COCO's 80 things then stuff, or all things.
    is_thing = np.arange(num_classes) < min(80, num_classes)
    predict = eval_loop.jit_predict(model_def, config.eval.postprocess, is_thing, 1000)
    images = jax.ShapeDtypeStruct((config.eval.batch_size, *crop, 3), np.uint8,
                                  sharding=sharding.batch_sharding(mesh, 4))
    per_chip = config.eval.batch_size / len(devices)
    # The step reads parameters and batch statistics only (jit drops the unused optimizer state from its
    # arguments), but a run's evaluation keeps the whole train state on the chip.
    used = _state_bytes_per_chip({"params": state["params"], "model_state": state["model_state"]})
    steps.append(_step_plan("eval", predict.lower(state, images), None, per_chip, state_bytes - used, chip,
                            advise("eval", per_chip)))
  summary = {"preset": config.model.preset, "dtype": config.model.dtype, "remat": config.model.remat,
             "crop": list(crop), "train_batch": config.train.batch_size, "eval_batch": config.eval.batch_size,
             "num_classes": num_classes}
  params = sum(x.size for x in jax.tree.leaves(state["params"])) / 1e6
  return Plan(config_summary=summary, target=where, num_chips=len(devices), chip=chip, mesh=dict(mesh.shape),
              params_millions=params, state_gib=state_bytes / GIB, steps=steps, wall_s=time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str]) -> None:
  from absl import app

  from panoptic_jax.training import config as config_lib

  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/coco.py")
  # A topology's compile needs no device of this host (CPU for constants): JAX must not start libtpu's TPU client.
  # Otherwise JAX_PLATFORMS as `cli.skip_absent_tpu` left it, which ran after this module imported JAX.
  platforms = "cpu" if _TOPOLOGY.value is not None else os.environ.get("JAX_PLATFORMS")
  if platforms:
    jax.config.update("jax_platforms", platforms)
  if _PER_CHIP.value is not None:
    if _TOPOLOGY.value is not None:
      chips = parse_topology(_TOPOLOGY.value).num_chips
    else:
      chips = jax.device_count()
    config.train.batch_size = _PER_CHIP.value * chips
  checked = ml_collections.ConfigDict(config.to_dict())
  checked.dataset.val = checked.dataset.val or "unused"  # The plan reads no dataset: the rest must be valid.
  config_lib.validate(checked, needs_train_data=False)
  report = plan(config, _TOPOLOGY.value, _MODE.value, _NUM_CLASSES.value or None)
  print(report.format())
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report.to_json(), f, indent=2)


def _flags():
  from absl import flags
  from ml_collections import config_flags

  return (config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True),
          flags.DEFINE_string("topology", None, "TPU slice to compile for (v5e:2x4, v5e-8, v4:2x2x1, v5p-8, v6e:2x2, "
                              "...); default: the local GPUs."),
          flags.DEFINE_enum("mode", "both", ["train", "eval", "both"], "Which steps to compile."),
          flags.DEFINE_integer("per_chip", None, "Images per chip in the train step (sets config.train.batch_size "
                               "to this times the chips)."),
          flags.DEFINE_integer("num_classes", 0, "Classes of the dataset without void; 0: those of the dataset the "
                               "preset is named after."),
          flags.DEFINE_string("json", None, "Also write the report to this JSON file."))


if __name__ == "__main__":
  from panoptic_jax import cli

  _CONFIG, _TOPOLOGY, _MODE, _PER_CHIP, _NUM_CLASSES, _JSON = _flags()
  cli.run_absl(main)
