"""The entry points' relaunch with glibc's transparent-huge-page tunable (panoptic_jax/huge_pages.py)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from panoptic_jax import huge_pages

MADVISE = "always [madvise] never\n"


@pytest.mark.parametrize("environ, thp_mode, libc, system, expected", [
    ({}, MADVISE, "glibc", "Linux", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, "glibc", "Linux", True),  # Kept, tunable appended.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE, "glibc", "Linux", False),  # The user's choice stands.
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, MADVISE, "glibc", "Linux", False),  # The relaunched process.
    ({}, "[always] madvise never\n", "glibc", "Linux", False),  # The kernel already uses huge pages.
    ({}, "always madvise [never]\n", "glibc", "Linux", False),
    ({}, None, "glibc", "Linux", False),  # No THP in this kernel.
    ({}, MADVISE, "", "Linux", False),  # musl: the tunable means nothing.
    ({}, MADVISE, "", "Darwin", False),
])
def test_relaunches_only_where_the_tunable_helps(environ, thp_mode, libc, system, expected):
  assert huge_pages.needs_relaunch(environ, thp_mode, libc, system) == expected


def test_relaunch_keeps_pid_arguments_and_environment_and_happens_once(tmp_path):
  script = tmp_path / "entry.py"
  script.write_text(textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {os.getcwd()!r})
      from panoptic_jax import huge_pages
      huge_pages.THP_MODE = __import__("pathlib").Path({str(tmp_path / "thp")!r})
      with open({str(tmp_path / "log")!r}, "a") as log:
        log.write(f"{{os.getpid()}} {{sys.argv[1:]}} {{os.environ.get('GLIBC_TUNABLES')}} {{os.environ['KEEP']}}\\n")
      huge_pages.relaunch_with_huge_pages()
  """))
  (tmp_path / "thp").write_text(MADVISE)
  env = dict(os.environ, KEEP="yes", GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  subprocess.run([sys.executable, str(script), "--flag=1", "x"], env=env, check=True, timeout=60)
  lines = (tmp_path / "log").read_text().splitlines()
  if not huge_pages.needs_relaunch({}, MADVISE, platform.libc_ver()[0], platform.system()):
    assert len(lines) == 1  # Not Linux with glibc: nothing to do.
    return
  first, second = (line.split(" ", 1) for line in lines)
  assert first[0] == second[0]  # The same process, re-executed.
  assert first[1] == "['--flag=1', 'x'] glibc.malloc.arena_max=4 yes"
  assert second[1] == "['--flag=1', 'x'] glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 yes"
