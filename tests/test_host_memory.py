"""The entry points' relaunch with glibc's malloc tunables and inline CPU dispatch, on CPU-only hosts."""

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


def test_inline_dispatch_runs_single_device_steps(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent(f"""
      import sys
      sys.path.insert(0, {os.getcwd()!r})
      from panoptic_jax import host_memory
      host_memory.run_cpu_executions_inline()
      import jax, jax.numpy as jnp
      print(jax.config.read("jax_cpu_enable_async_dispatch"), float(jax.jit(lambda x: (x @ x.T).sum())(jnp.ones((64, 64)))))
  """))
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu")).stdout.split()
  assert out == ["False", str(64.0 * 64 * 64)]


@pytest.mark.parametrize("environ, plugins, expected", [
    ({}, [], True),
    ({}, ["xla_cuda13"], False),  # A GPU plugin is installed: JAX may use the GPU.
    ({"JAX_PLATFORMS": "cpu"}, ["xla_cuda13"], True),  # The user keeps JAX on the CPU.
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], False),
])
def test_cpu_only_hosts_are_told_apart_without_importing_jax(monkeypatch, environ, plugins, expected):
  monkeypatch.setattr(host_memory, "_accelerator_plugins", lambda: plugins)
  assert host_memory.cpu_only(environ) == expected


@pytest.mark.parametrize("environ, relaunched", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "cuda"}, False),  # An accelerator host: nothing to gain.
    ({"JAX_PLATFORMS": "cpu", host_memory.OPT_OUT: "0"}, False),  # The user opted out.
])
def test_entry_points_tune_only_cpu_only_hosts_that_did_not_opt_out(tmp_path, environ, relaunched):
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {os.getcwd()!r})
      from panoptic_jax import host_memory
      host_memory.THP_MODE = __import__("pathlib").Path({str(tmp_path / "thp")!r})
      with open({str(tmp_path / "log")!r}, "a") as log:
        log.write(os.environ.get("GLIBC_TUNABLES", "-") + "\\n")
      host_memory.configure(malloc_tunables=True, inline_dispatch=False)
  """))
  (tmp_path / "thp").write_text(MADVISE)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  subprocess.run([sys.executable, str(script)], env=dict(env, **environ), check=True, timeout=60)
  lines = (tmp_path / "log").read_text().splitlines()
  if not host_memory.missing_tunables({}, MADVISE, platform.libc_ver()[0], platform.system()):
    assert lines == ["-"]  # Not Linux with glibc: nothing to do.
  else:
    assert len(lines) == (2 if relaunched else 1) and lines[0] == "-", lines
