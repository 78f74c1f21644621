"""Transparent huge pages for XLA:CPU's per-execution buffers: entry points re-execute themselves once with them.

XLA:CPU allocates an executable's temporaries afresh at every execution (~430 MB for the demo's train step, GBs for
ResNet-50 at 641) and frees them after it. glibc serves allocations that large with a new mmap, so every step
faults its memory in again, one 4 KiB page at a time: kernel time that cost ~20% of the demo's CPU step. glibc's
`glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) makes malloc advise such mappings to use transparent huge pages
(2 MiB), which is what the kernel's default THP mode ("madvise") waits for. Tunables are read when a process
starts, so `relaunch_with_huge_pages()` re-executes the command line once with the tunable set; where it cannot
help (not Linux or glibc, THP "never" or already "always", tunable already chosen) it returns and nothing changes.

    if __name__ == "__main__":
      huge_pages.relaunch_with_huge_pages()  # First thing: before threads start or files open.
      app.run(main)
"""

import os
import pathlib
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def needs_relaunch(environ: dict[str, str], thp_mode: str | None, libc: str, system: str) -> bool:
  """Whether re-executing with `TUNABLE=1` changes anything: Linux with glibc, THP mode "madvise", not chosen."""
  return (system == "Linux" and libc == "glibc" and thp_mode is not None and "[madvise]" in thp_mode
          and TUNABLE not in environ.get("GLIBC_TUNABLES", ""))


def relaunch_with_huge_pages() -> None:
  """Replaces this process with the same command line plus `GLIBC_TUNABLES=...:glibc.malloc.hugetlb=1`, if useful.

  Same PID, arguments and environment otherwise; the new process finds the tunable set and returns here.
  """
  try:
    thp_mode = THP_MODE.read_text()
  except OSError:
    thp_mode = None
  if not needs_relaunch(dict(os.environ), thp_mode, platform.libc_ver()[0], platform.system()):
    return
  tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1"]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, dict(os.environ, GLIBC_TUNABLES=tunables))
