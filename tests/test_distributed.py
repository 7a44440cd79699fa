"""Where a process takes its process-group settings from, and GPU memory settings."""

import pytest

from medseg_jax.parallel import distributed
from medseg_jax.errors import ConfigError

SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}


def test_flags_come_first():
  launch = distributed.detect("10.0.0.1:1234", 2, 1, environ={**SLURM, **OMPI})
  assert launch == distributed.Launch("flags", "10.0.0.1:1234", 2, 1)


@pytest.mark.parametrize("environ,source", [({**SLURM, **OMPI}, "slurm"), (OMPI, "openmpi"),
                                            ({}, "single"),
                                            ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"},
                                             "single")])
def test_environment_order(environ, source):
  assert distributed.detect(None, None, None, environ=environ).source == source


def test_partial_or_bad_flags_are_config_errors():
  with pytest.raises(ConfigError, match="go together"):
    distributed.detect("127.0.0.1:1", None, 0, environ={})
  with pytest.raises(ConfigError, match="process_id"):
    distributed.detect("127.0.0.1:1", 2, 2, environ={})


def test_memory_settings_respect_explicit_environment():
  env = {}
  distributed.configure_memory(False, 0.5, environ=env)
  assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false",
                 "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}
  distributed.configure_memory(True, 0.5, environ=env)
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
  with pytest.raises(ConfigError, match="gpu_memory_fraction"):
    distributed.configure_memory(True, 1.5, environ={})


def test_coordinator_wait_returns_once_it_listens_and_fails_clearly_otherwise():
  import socket
  from medseg_jax.errors import MedsegError
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    distributed.wait_for_coordinator(f"127.0.0.1:{port}", 2)
  with pytest.raises(MedsegError, match=f"cannot reach the coordinator at 127.0.0.1:{port}"):
    distributed.wait_for_coordinator(f"127.0.0.1:{port}", 1)
  with pytest.raises(ConfigError, match="HOST:PORT"):
    distributed.wait_for_coordinator("nohostport", 1)


def test_local_devices_need_a_process_group():
  with pytest.raises(ConfigError, match="local_device_ids"):
    distributed.initialize(distributed.Launch("single"), [0], 10)
