"""Micro-benchmark: the XLA:CPU convolutions of `panoptic_jax/ops/cpu_conv.py` against lax, forward and backward.

    python bench/conv.py [--rounds 7]

Rows, at the shapes of kmax_r50_coco's 641 x 641 train step (batch 2):
- Dense convolutions (ResNet-50's 7x7 stem and 3x3 convolutions of every stage, stride 1 and 2):
  `lax.conv_general_dilated` against `cpu_conv.conv_general_dilated` (Winograd's F(2x2, 3x3) for the stride-1
  3x3 ones, forward and input gradient, lax's for the others; the kernel gradient as one matmul over the im2col
  patches), the forward plus both gradients at batch 2 and the forward alone (with an affine map and a ReLU after
  it, as in the model) at batch 1, the inference case.
- Depthwise 5x5 + affine + GELU + 1x1 (the kMaX predictor's pixel head): forward alone and forward + backward, with
  training's forward as one fused loop over whole images against the blocked loop (`cpu_conv.TRAIN_BLOCK_ELEMENTS`).

It times the convolutions alone, each in its own program: no model around them, no start-up, no data.

Each cell is the median of `--rounds` calls after a warm-up call. The two variants of a row are timed alternately,
so a drift of this shared machine's speed affects both. Values and gradients are checked equal (relative 1e-4).
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import common  # noqa: E402
from panoptic_jax import cli  # noqa: E402
from panoptic_jax.model import layers  # noqa: E402
from panoptic_jax.ops import cpu_conv, xla_cpu  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")
# (name, input side, in channels, out channels, kernel, stride) at a 641 crop, batch 2.
DENSE = [("stem 7x7", 641, 3, 64, 7, 2), ("stage 1 3x3", 161, 64, 64, 3, 1), ("stage 2 3x3", 81, 128, 128, 3, 1),
         ("stage 3 3x3", 41, 256, 256, 3, 1), ("stage 4 3x3", 21, 512, 512, 3, 1),
         ("stage 2 3x3 stride 2", 161, 128, 128, 3, 2), ("stage 3 3x3 stride 2", 81, 256, 256, 3, 2),
         ("stage 4 3x3 stride 2", 41, 512, 512, 3, 2)]


def _time_alternately(fns, args, rounds: int) -> list[float]:
  """Median milliseconds of each jitted fn, calls interleaved round by round."""
  for f in fns:
    jax.block_until_ready(f(*args))
  times = [[] for _ in fns]
  for _ in range(rounds):
    for f, t in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      t.append(time.perf_counter() - start)
  return [float(np.median(t)) * 1e3 for t in times]


def _check(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = float(jnp.max(jnp.abs(y))) or 1.0
    if float(jnp.max(jnp.abs(x - y))) > 1e-4 * scale:
      raise AssertionError("the two formulations disagree")


def dense_rows(rounds: int) -> list[list]:
  rows = []
  for name, side, cin, cout, k, stride in DENSE:
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) * 0.05
    pad = ((k // 2, k // 2), (k // 2, k // 2))

    def step(conv, x, w):
      return jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride, stride), pad,
                                                                    dimension_numbers=NHWC))), (0, 1))(x, w)

    def forward(conv, x, w):
      return jax.nn.relu(conv(x, w, (stride, stride), pad, dimension_numbers=NHWC) * 1.1 + 0.1)

    cells = [f"{name}, {side}x{side}, {cin}->{cout}"]
    for fn, batch in ((step, 2), (forward, 1)):
      x = jax.random.normal(jax.random.key(0), (batch, side, side, cin))
      lax_fn = jax.jit(functools.partial(fn, jax.lax.conv_general_dilated))
      ours = jax.jit(functools.partial(fn, cpu_conv.conv_general_dilated))
      _check(ours(x, w), lax_fn(x, w))
      t_lax, t_ours = _time_alternately([lax_fn, ours], (x, w), rounds)
      cells += [f"{t_lax:.1f}", f"{t_ours:.1f}", f"{t_lax / t_ours:.2f}x"]
    gflop = 3 * 2 * 2 * ((side - 1) // stride + 1) ** 2 * k * k * cin * cout / 1e9
    rows.append(cells[:1] + [f"{gflop:.1f}"] + cells[1:])
  return rows


def depthwise_rows(rounds: int) -> list[list]:
  x = jax.random.normal(jax.random.key(0), (2, 161, 161, 256))
  kernel = jax.random.normal(jax.random.key(1), (5, 5, 1, 256)) * 0.1
  w = jax.random.normal(jax.random.key(2), (256, 256)) * 0.05

  def head(block, x, kernel, w):
    y = cpu_conv.depthwise_conv(x, kernel[:, :, 0], ((2, 2), (2, 2)), (1, 1), train_block_elements=block)
    return jnp.sum(xla_cpu.matmul_last_axis(layers.gelu(y * 1.1 + 0.2), w) ** 2)

  forward = jax.jit(functools.partial(head, None))
  grads = {label: jax.jit(jax.value_and_grad(functools.partial(head, block), (0, 1, 2))).lower(x, kernel, w).compile()
           for label, block in (("one fused loop", None), ("blocked", cpu_conv.TRAIN_BLOCK_ELEMENTS))}
  _check(grads["blocked"](x, kernel, w), grads["one fused loop"](x, kernel, w))
  t_fwd, t_whole, t_blocked = _time_alternately([forward, grads["one fused loop"], grads["blocked"]],
                                                (x, kernel, w), rounds)
  return [["forward (inference: one fused loop)", f"{t_fwd:.1f}", "", ""],
          ["forward + backward, training's forward as one fused loop", f"{t_whole:.1f}", "", ""],
          ["forward + backward, training's forward blocked", f"{t_blocked:.1f}", f"{t_whole / t_blocked:.2f}x", ""]]


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  args = parser.parse_args(argv)
  print(common.header("CPU convolutions against lax"))
  print(common.markdown_table(["convolution", "GFLOP fwd+bwd (batch 2)", "fwd+bwd: lax ms", "ours ms", "speed-up",
                               "forward (batch 1): lax ms", "ours ms", "speed-up"], dense_rows(args.rounds)))
  print()
  print(common.markdown_table(["depthwise 5x5 + GELU + 1x1 at 161x161x256", "ms", "speed-up", ""],
                              depthwise_rows(args.rounds)))
  print(f"\nload average (1 min) at the end: {common.load_average():.2f}")


if __name__ == "__main__":
  cli.run(main, malloc_tunables=True, inline_dispatch=True)  # As the training entry point runs.
