"""Shared pytest setup: fake CPU devices, persistent compilation cache, the real fixtures (tests/fixtures).

JAX reads its device count once, at first use, so the environment is set here before any test imports JAX.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must follow the environment set-up above)
import pytest  # noqa: E402

pytest_plugins = ["tests.s3_server", "tests.gcs_server"]  # Real servers: SeaweedFS (s3_*), a GCS emulator (gcs_*).

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"

jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".cache" / "jax_compilation"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def fixtures() -> pathlib.Path:
  """Small real COCO / Cityscapes ground truth with the official evaluators' numbers (tests/fixtures/README.md)."""
  return FIXTURES
