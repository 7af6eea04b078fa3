"""Test-session setup: 8 fake CPU devices (set before jax is imported anywhere), offline hubs."""

import os
from pathlib import Path

# Appended to XLA_FLAGS set by the caller (a setdefault would drop the fake devices), unless it already sets a count.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in _xla_flags:
  os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count=8".strip()
# Tests run on CPU; the TPU (libtpu, the [tpu] extra) is only a compile target (bird_jax.compile), which works
# with this set, and without it every JAX process would look for a TPU and print warnings on stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
  return FIXTURES
