"""The entry points' relaunch with glibc's malloc tunables and inline CPU dispatch (panoptic_jax/host_memory.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from panoptic_jax import host_memory

MADVISE = "always [madvise] never\n"
HEAP = {"glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(2 ** 40)}
ALL = {**HEAP, "glibc.malloc.hugetlb": "1"}


@pytest.mark.parametrize("environ, thp_mode, libc, system, expected", [
    ({}, MADVISE, "glibc", "Linux", ALL),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, "glibc", "Linux", ALL),  # Kept, tunables appended.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE, "glibc", "Linux", HEAP),  # The user's choice stands.
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=4:glibc.malloc.hugetlb=0"}, MADVISE, "glibc", "Linux",
     {"glibc.malloc.trim_threshold": str(2 ** 40)}),
    ({"GLIBC_TUNABLES": ":".join(f"{k}={v}" for k, v in ALL.items())}, MADVISE, "glibc", "Linux", {}),  # Relaunched.
    ({}, "[always] madvise never\n", "glibc", "Linux", HEAP),  # The kernel already uses huge pages.
    ({}, "always madvise [never]\n", "glibc", "Linux", HEAP),
    ({}, None, "glibc", "Linux", HEAP),  # No THP in this kernel.
    ({}, MADVISE, "", "Linux", {}),  # musl: the tunables mean nothing.
    ({}, MADVISE, "", "Darwin", {}),
])
def test_adds_only_the_tunables_that_apply_and_are_not_chosen(environ, thp_mode, libc, system, expected):
  assert host_memory.missing_tunables(environ, thp_mode, libc, system) == expected


def test_relaunch_keeps_pid_arguments_and_environment_and_happens_once(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {os.getcwd()!r})
      from panoptic_jax import host_memory
      host_memory.THP_MODE = __import__("pathlib").Path({str(tmp_path / "thp")!r})
      with open({str(tmp_path / "log")!r}, "a") as log:
        log.write(f"{{os.getpid()}} {{sys.argv[1:]}} {{os.environ.get('GLIBC_TUNABLES')}} {{os.environ['KEEP']}}\\n")
      host_memory.relaunch_with_malloc_tunables()
  """))
  (tmp_path / "thp").write_text(MADVISE)
  env = dict(os.environ, KEEP="yes", GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  subprocess.run([sys.executable, str(script), "--flag=1", "x"], env=env, check=True, timeout=60)
  lines = (tmp_path / "log").read_text().splitlines()
  missing = host_memory.missing_tunables({}, MADVISE, platform.libc_ver()[0], platform.system())
  if not missing:
    assert len(lines) == 1  # Not Linux with glibc: nothing to do.
    return
  first, second = (line.split(" ", 1) for line in lines)
  assert first[0] == second[0]  # The same process, re-executed.
  assert first[1] == "['--flag=1', 'x'] glibc.malloc.arena_max=4 yes"
  added = ":".join(f"{k}={v}" for k, v in ALL.items() if k in missing)
  assert second[1] == f"['--flag=1', 'x'] glibc.malloc.arena_max=4:{added} yes"


def test_inline_dispatch_runs_single_device_steps_and_must_come_first(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.getcwd()!r})
      import jax, jax.numpy as jnp
      from panoptic_jax import host_memory
      host_memory.run_cpu_executions_inline()
      step = jax.jit(lambda x: (x @ x.T).sum())
      print(float(step(jnp.ones((64, 64)))))
      try:
        host_memory.run_cpu_executions_inline()
      except RuntimeError as e:
        print("late:", e)
  """))
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.splitlines()
  assert out[0] == str(64.0 * 64 * 64)
  assert out[1].startswith("late: run_cpu_executions_inline() must run before JAX's first use of a device")
