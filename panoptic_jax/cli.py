"""What every command-line entry point shares: the host's memory settings, and user errors as one clear line.

    if __name__ == "__main__":
      cli.run(main)                                  # main(argv) -> exit status, argparse inside
      cli.run_absl(main, malloc_tunables=True)       # an absl app (flags parsed here)

libtpu, when installed on a host without a TPU (requirements-tpu.txt: the memory plan's TPU compiler), is kept out of
the CPU programs: JAX would otherwise start a TPU client at first use (failing, with a screenful of libtpu errors) and
`host_memory` would take the host for an accelerator host. See `skip_absent_tpu`.

A user error (`panoptic_jax.errors.UserError`: a bad path, config field or file, storage that cannot be reached) or
an operating-system error (a missing file, no permission, a full disk) prints `error: <message>` on stderr and exits
with status 2, without a traceback; so does a bad command-line flag. `--verbose` (or `PANOPTIC_JAX_TRACEBACK=1`)
shows the traceback too. Any other exception is a bug: it keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import glob
import importlib.util
import logging
import os
import pathlib
import re
import sys
from typing import Callable, NoReturn, Sequence

from panoptic_jax import host_memory
from panoptic_jax.errors import UserError

TRACEBACK_ENV = "PANOPTIC_JAX_TRACEBACK"
VERBOSE_FLAG = "--verbose"
EXIT_USER_ERROR = 2


_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}  # As jax's hardware_utils.


def tpu_chips_present() -> bool:
  """Whether a TPU chip is on this host's PCI bus (what JAX checks; read here without importing JAX)."""
  for vendor in map(pathlib.Path, glob.glob("/sys/bus/pci/devices/*/vendor")):
    try:
      ids = vendor.read_text().strip(), vendor.with_name("device").read_text().strip()
    except OSError:
      continue
    if ids[0] == _GOOGLE_PCI_VENDOR and ids[1] in _TPU_PCI_DEVICES:
      return True
  return False


def skip_absent_tpu() -> None:
  """`JAX_PLATFORMS=cpu` where libtpu is the only accelerator runtime installed and the host has no TPU, unless the
  user set JAX_PLATFORMS. Compiling for a TPU topology (the memory plan) loads libtpu itself and still works."""
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if host_memory._accelerator_plugins() == ["libtpu"] and not tpu_chips_present():
    os.environ["JAX_PLATFORMS"] = "cpu"


def _split_verbose(argv: Sequence[str]) -> tuple[bool, list[str]]:
  verbose = os.environ.get(TRACEBACK_ENV, "") not in ("", "0") or VERBOSE_FLAG in argv
  return verbose, [a for a in argv if a != VERBOSE_FLAG]


def describe(error: BaseException) -> str:
  """The one line a user sees for a user or operating-system error."""
  if isinstance(error, OSError) and not isinstance(error, UserError):
    where = f": {error.filename}" if error.filename else ""
    if error.errno == errno.ENOSPC:
      return f"no space left on the device{where} ({error.strerror})"
    if error.strerror:
      return f"{error.strerror}{where}"
  return str(error)


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return EXIT_USER_ERROR


def _call(body: Callable[[], int | None], verbose: bool) -> int:
  try:
    return body() or 0
  except (UserError, OSError) as e:
    if verbose:
      raise
    return _fail(describe(e))


def run(main: Callable[[list[str]], int | None], *, malloc_tunables: bool = False,
        inline_dispatch: bool = False) -> NoReturn:
  """Runs `main(argv without the program name)` as an entry point and exits with its status.

  Args:
    main: the command; parses its own arguments.
    malloc_tunables, inline_dispatch: the `host_memory` settings this command benefits from (CPU-only hosts).
  """
  skip_absent_tpu()
  host_memory.configure(malloc_tunables=malloc_tunables, inline_dispatch=inline_dispatch)
  verbose, argv = _split_verbose(sys.argv)
  sys.exit(_call(lambda: main(argv[1:]), verbose))


def _config_error(error: Exception, argv: Sequence[str]) -> str:
  """A config-override error of ml_collections' flag parser, as one line naming the flag."""
  text = str(error).encode().decode("unicode_escape").strip("'\" ")
  key = re.match(r"'?([^'\n]+)'?", text)
  flag = next((a.split("=", 1)[0] for a in argv if key and a.startswith("--config.") and
               re.search(rf"[.]{re.escape(key.group(1))}(=|$|[.])", a)), None)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  if flag is not None:
    return f"{flag}: no such config field" + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
  return " ".join(text.split())


def run_absl(main: Callable[[list[str]], int | None], *, argv_hook: Callable[[list[str]], list[str]] | None = None,
             malloc_tunables: bool = False, inline_dispatch: bool = False) -> NoReturn:
  """Runs an absl app: flags parsed here (a bad flag is one line, not a traceback), then `main(argv)`.

  Args:
    main: the absl main function.
    argv_hook: rewrites the command line before the flags are parsed (e.g. to supply a default config).
    malloc_tunables, inline_dispatch: as in `run`.
  """
  from absl import app, flags  # Here: absl only for the commands that use it.

  skip_absent_tpu()
  host_memory.configure(malloc_tunables=malloc_tunables, inline_dispatch=inline_dispatch)
  verbose, argv = _split_verbose(sys.argv)

  def parse(argv: list[str]) -> list[str]:
    try:
      argv = argv_hook(argv) if argv_hook is not None else argv
      repeated = sorted({a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                         and sum(b.split("=", 1)[0] == a.split("=", 1)[0] for b in argv) > 1})
      if repeated:
        raise UserError(f"{', '.join(repeated)} given more than once; give each config field once")
      return flags.FLAGS(argv)
    except flags.Error as e:
      message = f"{e} (--helpfull lists the flags)"
    except UserError as e:
      message = str(e)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections' config overrides raise these.
      if verbose:
        raise
      message = _config_error(e, argv)
    sys.exit(_fail(message))

  app.run(lambda argv: _call(lambda: main(argv), verbose), argv=argv, flags_parser=parse)


COMPILATION_CACHE = "~/.cache/panoptic_jax/jax_compilation"


def initialise_jax(coordinator_address: str | None = None, num_processes: int | None = None,
                   process_id: int | None = None, multihost: bool = False,
                   compilation_cache: str = COMPILATION_CACHE) -> None:
  """Joins the other processes of a multi-process run (explicitly, or detected with `multihost` on TPU VMs and
  SLURM) and turns on the persistent compilation cache ('' leaves it off). JAX is imported here, after the launch
  scripts' flags (XLA_FLAGS) have been set."""
  import jax

  if coordinator_address:
    # Cross-process collectives between CPU devices (local multi-process runs); no effect on GPU / TPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif multihost:
    jax.distributed.initialize()
  if compilation_cache:
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(compilation_cache).expanduser()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.info("JAX %s: process %d of %d, %d local / %d global devices (%s)", jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.default_backend())


def pair_of_ints(text: str) -> tuple[int, int]:
  """argparse type of options such as `--crop_size 641,641` (one number: a square)."""
  try:
    values = tuple(int(v) for v in text.split(","))
  except ValueError:
    values = ()
  if len(values) == 1:
    values = values * 2
  if len(values) != 2:
    raise argparse.ArgumentTypeError(f"expected H,W (two integers, e.g. 641,641), found {text!r}")
  return values
