"""Forces 8 CPU devices before jax is imported anywhere in the test session."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices8():
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 fake CPU devices, got {devices}"
  return devices
