"""Forces 8 CPU devices before jax is imported anywhere in the test session, and shares
one compilation cache between the session and the processes it starts."""

import atexit
import os
import shutil
import sys
import tempfile

# XLA compiles with its default settings: the machine code a user's run gets.
# --xla_backend_optimization_level=0 would save 3-18% of the slowest files' CPU time, but
# its code generation fuses multiply-adds in some kernels and not in others: values then
# differ from a default build in the last bits, and one value recomputed in two kernels
# can differ between them (tests/test_models.py compiles that way on purpose).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Many tests compile the same tiny steps, in this process and in the `medseg_jax.main`
# processes they start (which inherit the environment): a persistent cache compiles each
# once. Cached executables are the ones XLA would build, so results stay bit for bit.
# The process that makes the directory (pytest itself, or xdist's controller, whose workers
# inherit it) removes it when the session ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="medseg-jax-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the environment is set)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def devices8():
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 fake CPU devices, got {devices}"
  return devices
