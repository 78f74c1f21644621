"""Cheap memory for XLA:CPU's per-execution buffers: glibc tunables (entry points re-execute themselves once with
them) and inline single-device dispatch.

XLA:CPU allocates an executable's temporaries afresh at every execution (~430 MB for the demo's train step, 6.7 GB
for ResNet-50 at 641) and frees them after it. glibc serves any block over 32 MiB with a new mmap and unmaps it on
free, so every step the kernel faults that memory in again and zeroes it: ~20% of the demo's CPU step with 4 KiB
pages, and still 4-5 s of kernel time per 13-s R50 step with 2 MiB pages (`perf`: `clear_page_erms` under the
step's first writes). Two changes remove it:

- glibc tunables, read when a process starts (so `relaunch_with_malloc_tunables()` re-executes the command line
  once with them):
  - `glibc.malloc.mmap_max=0`: large blocks come from the main heap instead of their own mapping;
  - `glibc.malloc.trim_threshold=2^40`: freed heap memory stays mapped, so the next step reuses it as is;
  - `glibc.malloc.hugetlb=1` where the kernel's transparent huge pages are in "madvise" mode (its default): the heap
    is advised to use 2 MiB pages.
- `run_cpu_executions_inline()`: single-device CPU executions run on the calling (main) thread. Only the main
  thread allocates from the heap those tunables govern: other threads use glibc's per-thread arenas, which map
  blocks over 64 MiB separately whatever the tunables say. Together: kernel time per R50 step 4.3 -> 0.1 s, the
  step 13.9 -> 11.3 s (BENCHMARKS.md, "Training step", session 9); neither change alone moved it.

The process keeps its peak heap mapped until it exits (its peak RSS is unchanged). Executions over several devices
of one process (fake CPU devices, `--xla_force_host_platform_device_count`) stay asynchronous on worker threads, so
their temporaries are still mapped afresh at every step; one CPU device per process is what the fix covers. A
tunable the user already set in `GLIBC_TUNABLES` stands; where none applies (not Linux or glibc) nothing changes.

    if __name__ == "__main__":
      host_memory.relaunch_with_malloc_tunables()  # First thing: before threads start or files open.
      app.run(main)
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys

THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_HEAP_TUNABLES = {"glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(2 ** 40)}
_HUGE_PAGES = {"glibc.malloc.hugetlb": "1"}


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

  For processes that alternate a large jitted step with little host work (training, inference benchmarks); not for
  pipelines that overlap host work with single-device executions (the evaluator). Call it before JAX creates its
  CPU client (the first use of a device); computations over several devices keep asynchronous dispatch.
  """
  import jax  # Here, so that importing this module (first thing in an entry point) does not import JAX.
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    raise RuntimeError("run_cpu_executions_inline() must run before JAX's first use of a device: the CPU client "
                       "reads jax_cpu_enable_async_dispatch when it is created")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
