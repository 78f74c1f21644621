"""Test-only start-up hook for the multi-process runs' workers (on PYTHONPATH only in their environment): every JAX
process writes its compiled programs to the persistent compilation cache, not process 0 alone.

JAX writes cache entries from process 0 only, and on CPU a multi-process cache key holds the process's own topology
fingerprint (jax/_src/cache_key.py: `accelerator_config`), different in each process but the same from run to run.
So process 1 of the tests' two-process runs never found its programs and compiled the train step again in every
launch (about 90 s on the loaded 2-core CI machine, while process 0, which had read its entry, waited at the
compile barrier). With this hook each process reads back what it wrote itself in an earlier launch: the programs are
the ones it would compile; only where they come from changes. The hook patches `jax._src.compiler._cache_write`
when JAX imports that module, so that the fakes' own Python processes do not import JAX at start-up.
"""

import importlib.abc
import importlib.util
import sys
import warnings

_MODULE = "jax._src.compiler"


def _patch(compiler) -> None:
  original = compiler._cache_write  # pylint: disable=protected-access

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if (compiler.distributed.global_state.process_id == 0 or host_callbacks
        or compile_time_secs < compiler.config.persistent_cache_min_compile_time_secs.value):
      return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
    try:
      compiler.compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                         int(compile_time_secs))
    except Exception as e:  # pylint: disable=broad-except  (as JAX does: a cache that fails is only slower)
      warnings.warn(f"Error writing persistent compilation cache entry for {module_name!r}: {e!r}")
    return None

  compiler._cache_write = cache_write  # pylint: disable=protected-access


class _PatchOnImport(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path, target=None):
    del path, target
    if name != _MODULE:
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
      return spec
    execute = spec.loader.exec_module

    def exec_module(module):
      execute(module)
      _patch(module)

    spec.loader.exec_module = exec_module
    return spec


sys.meta_path.insert(0, _PatchOnImport())
