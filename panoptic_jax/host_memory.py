"""Cheap memory for XLA:CPU's per-execution buffers, on CPU-only hosts: glibc malloc tunables and inline dispatch.

XLA:CPU allocates an executable's temporaries afresh at every execution (several GB for a ResNet-50 train step) and
frees them after it. glibc serves any block over 32 MiB with a new mmap and unmaps it on free, so at every step the
kernel faults that memory in again and zeroes it: seconds of kernel time per ResNet-50 step (BENCHMARKS.md, "Training
step"). Two process settings remove it:

- glibc tunables, read when a process starts (so `relaunch_with_malloc_tunables()` re-executes the command line
  once with them):
  - `glibc.malloc.mmap_max=0`: large blocks come from the main heap instead of their own mapping;
  - `glibc.malloc.trim_threshold=2^40`: freed heap memory stays mapped, so the next step reuses it as is;
  - `glibc.malloc.hugetlb=1` where the kernel's transparent huge pages are in "madvise" mode (its default): the heap
    is advised to use 2 MiB pages.
- `run_cpu_executions_inline()`: single-device CPU executions run on the calling (main) thread. Only the main
  thread allocates from the heap those tunables govern: other threads use glibc's per-thread arenas, which map
  blocks over 64 MiB separately whatever the tunables say. Neither change helps alone.

Both apply only where they help: on a host whose JAX can only use the CPU (no GPU or TPU plugin installed, or
`JAX_PLATFORMS=cpu`), on Linux with glibc. On an accelerator host the device's allocator keeps its own memory, and
the tunables would only keep the host's peak heap mapped. The process keeps its peak heap mapped until it exits (its
peak RSS is unchanged). Executions over several devices of one process (fake CPU devices) stay asynchronous.

Opting out: `PANOPTIC_JAX_MALLOC_TUNING=0`; a tunable the user has set in `GLIBC_TUNABLES` stands. The command-line
entry points call `configure()` through `panoptic_jax.cli`, the one place that does.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import pkgutil
import platform
import sys

THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
OPT_OUT = "PANOPTIC_JAX_MALLOC_TUNING"
_HEAP_TUNABLES = {"glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(2 ** 40)}
_HUGE_PAGES = {"glibc.malloc.hugetlb": "1"}
def _accelerator_plugins() -> list[str]:
  """JAX's PJRT plugins (the `jax_plugins` namespace: CUDA, ROCm, ...) and the TPU runtime that are installed."""
  found = ["libtpu"] if importlib.util.find_spec("libtpu") is not None else []
  spec = importlib.util.find_spec("jax_plugins")
  if spec is not None and spec.submodule_search_locations:
    found += [module.name for module in pkgutil.iter_modules(list(spec.submodule_search_locations))]
  return found


def cpu_only(environ: dict[str, str]) -> bool:
  """Whether JAX in this process can only use the CPU (decided without importing JAX)."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  return not _accelerator_plugins()


def missing_tunables(environ: dict[str, str], thp_mode: str | None, libc: str, system: str) -> dict[str, str]:
  """The tunables to add to `environ["GLIBC_TUNABLES"]`: all of them on Linux with glibc (huge pages only in THP
  "madvise" mode), none the user has set already; empty elsewhere."""
  if system != "Linux" or libc != "glibc":
    return {}
  wanted = dict(_HEAP_TUNABLES)
  if thp_mode is not None and "[madvise]" in thp_mode:
    wanted.update(_HUGE_PAGES)
  chosen = {item.split("=", 1)[0] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item}
  return {name: value for name, value in wanted.items() if name not in chosen}


def relaunch_with_malloc_tunables() -> None:
  """Replaces this process with the same command line plus the missing tunables in `GLIBC_TUNABLES`, if any.

  Same PID, arguments and environment otherwise; the new process finds the tunables set and returns here.
  """
  try:
    thp_mode = THP_MODE.read_text()
  except OSError:
    thp_mode = None
  missing = missing_tunables(dict(os.environ), thp_mode, platform.libc_ver()[0], platform.system())
  if not missing:
    return
  tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES", "")] + [f"{k}={v}" for k, v in missing.items()]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))


def run_cpu_executions_inline() -> None:
  """Runs single-device CPU executions on the calling thread (`jax_cpu_enable_async_dispatch=False`).

  For processes that alternate a large jitted step with little host work (training, inference); not for pipelines
  that overlap host work with single-device executions (the evaluator). The CPU client reads the setting when it is
  created, so this must come before JAX's first use of a device.
  """
  import jax  # Here: the relaunch, before it, should not pay for importing JAX.

  jax.config.update("jax_cpu_enable_async_dispatch", False)


def configure(*, malloc_tunables: bool, inline_dispatch: bool) -> None:
  """Applies the chosen settings when this is a CPU-only host and the user has not opted out. First thing in an
  entry point: the relaunch replaces the process image."""
  if os.environ.get(OPT_OUT, "1") == "0" or not cpu_only(dict(os.environ)):
    return
  if malloc_tunables:
    relaunch_with_malloc_tunables()
  if inline_dispatch:
    run_cpu_executions_inline()
