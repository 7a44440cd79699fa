"""Multi-process start-up: jax.distributed, local devices and GPU memory, before JAX runs.

Where the process group comes from, in this order: explicit flags
(--coordinator_address, --num_processes, --process_id); SLURM's environment; Open
MPI's environment (OMPI_COMM_WORLD_*); otherwise a single process. JAX's own
distributed runtime (a coordinator plus gloo collectives on CPU, NCCL on GPU)
carries the training.
"""

import dataclasses
import os
import socket
import time
from typing import Any

from absl import logging

from medseg_jax.errors import ConfigError, MedsegError, first_line


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the group; `source` says where the settings came from."""

  source: str                       # flags | slurm | openmpi | single
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def detect(coordinator_address: str | None, num_processes: int | None,
           process_id: int | None, environ=os.environ) -> Launch:
  """Chooses the process group's settings from flags, SLURM, Open MPI or none."""
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given):
    if not all(given):
      raise ConfigError("--coordinator_address, --num_processes and --process_id go together")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id}: must be in [0, {num_processes})")
    return Launch("flags", coordinator_address, num_processes, process_id)
  if int(environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in environ:
    return Launch("slurm")  # jax.distributed reads the rest from SLURM's variables
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return Launch("openmpi")
  return Launch("single")


def configure_memory(preallocate: bool, memory_fraction: float, environ=os.environ) -> None:
  """GPU memory settings; they only take effect before JAX starts its backend.

  Explicit XLA_PYTHON_CLIENT_* variables in the environment win over the config.
  """
  environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "true" if preallocate else "false")
  if memory_fraction:
    if not 0 < memory_fraction <= 1:
      raise ConfigError(f"parallel.gpu_memory_fraction={memory_fraction}: must be in (0, 1]")
    environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(memory_fraction))


def wait_for_coordinator(address: str, timeout_seconds: float) -> None:
  """Waits until HOST:PORT accepts connections; a clear error after `timeout_seconds`.

  Without this, JAX's runtime aborts the process with a native stack trace when the
  coordinator cannot be reached.
  """
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"--coordinator_address={address}: expected HOST:PORT")
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise MedsegError(f"cannot reach the coordinator at {address} within "
                          f"{timeout_seconds:g} s ({e.strerror or e})") from e
      time.sleep(0.5)


def initialize(launch: Launch, local_device_ids: list[int] | None,
               timeout_seconds: int) -> None:
  """Joins the process group (no-op for a single process, which picks its devices with
  CUDA_VISIBLE_DEVICES or the like).

  `timeout_seconds` bounds both reaching the coordinator and noticing a peer that
  died: the others then fail with an error instead of hanging.
  """
  if launch.source == "single":
    if local_device_ids:
      raise ConfigError("--local_device_ids: only with several processes (a single process "
                        "picks its GPUs with CUDA_VISIBLE_DEVICES)")
    return
  import jax  # pylint: disable=import-outside-toplevel
  # Stop requests go through the key-value store (training/preemption.py). JAX's own
  # preemption service would catch SIGTERM in C++ until the loop's handler replaces it,
  # so a SIGTERM during start-up would be ignored.
  jax.config.update("jax_enable_preemption_service", False)
  kwargs = dict(initialization_timeout=timeout_seconds,
                heartbeat_timeout_seconds=timeout_seconds, shutdown_timeout_seconds=timeout_seconds)
  if launch.source == "flags":
    if launch.process_id != 0:  # process 0 starts the coordinator; the others must reach it
      wait_for_coordinator(launch.coordinator_address, timeout_seconds)
    kwargs.update(coordinator_address=launch.coordinator_address,
                  num_processes=launch.num_processes, process_id=launch.process_id)
  try:
    jax.distributed.initialize(local_device_ids=local_device_ids, **kwargs)
  except Exception as e:  # the runtime raises several types; all mean "no process group"
    raise MedsegError(f"jax.distributed ({launch.source}) could not start: "
                      f"{first_line(e)}") from e
  logging.info("Process %d of %d (%s), %d local devices of %d", jax.process_index(),
               jax.process_count(), launch.source, jax.local_device_count(),
               jax.device_count())


def client() -> Any:
  """The process group's client of JAX's coordination service (its key-value store and
  barriers). JAX keeps it in a private module; orbax reads it from there too."""
  from jax._src import distributed as jax_distributed  # pylint: disable=import-outside-toplevel
  return jax_distributed.global_state.client
