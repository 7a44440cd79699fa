"""Multi-process start-up: jax.distributed, local devices and GPU memory, before JAX runs.

Where the process group comes from, in this order: explicit flags
(--coordinator_address, --num_processes, --process_id); SLURM's environment; Open
MPI's environment (OMPI_COMM_WORLD_*); otherwise a single process. JAX's own
distributed runtime (a coordinator plus gloo collectives on CPU, NCCL on GPU)
carries the training.

`PeerWatch` ends a process whose peer was lost with one line and exit code
`PEER_LOST_EXIT_CODE`, instead of the runtime's abort.
"""

import contextlib
import dataclasses
import os
import socket
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax._src import distributed as jax_distributed  # private: see client()
from jax.errors import JaxRuntimeError

from medseg_jax.errors import ConfigError, MedsegError, first_line

# EX_TEMPFAIL: another process of the group was lost; the same command on every process
# continues from the newest checkpoint.
PEER_LOST_EXIT_CODE = 75
_KEYS = "medseg/peers/"  # this module's keys in the coordination service's key-value store


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


def initialize(launch: Launch, local_device_ids: list[int] | None, timeout_seconds: int,
               checkpoints: str | None = None) -> contextlib.AbstractContextManager:
  """Joins the process group (no-op for a single process, which picks its devices with
  CUDA_VISIBLE_DEVICES or the like).

  `timeout_seconds` bounds both reaching the coordinator and noticing a peer that was
  lost. Returns the context inside which a lost peer ends this process with one line
  naming it and the newest checkpoint in the directory `checkpoints` (a `PeerWatch`;
  nothing for a single process).
  """
  if launch.source == "single":
    if local_device_ids:
      raise ConfigError("--local_device_ids: only with several processes (a single process "
                        "picks its GPUs with CUDA_VISIBLE_DEVICES)")
    return contextlib.nullcontext()
  # Stop requests go through the key-value store (training/preemption.py). JAX's own
  # preemption service would catch SIGTERM in C++ until the loop's handler replaces it,
  # so a SIGTERM during start-up would be ignored.
  jax.config.update("jax_enable_preemption_service", False)
  # The runtime aborts every process once it misses a process's heartbeats; PeerWatch
  # notices the loss within `timeout_seconds` and ends this process cleanly before that.
  kwargs = dict(initialization_timeout=timeout_seconds,
                heartbeat_timeout_seconds=2 * timeout_seconds,
                shutdown_timeout_seconds=timeout_seconds)
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
  return PeerWatch(timeout_seconds, checkpoints)


def client() -> Any:
  """The process group's client of JAX's coordination service (its key-value store and
  barriers). JAX keeps it in a private module; orbax reads it from there too."""
  return jax_distributed.global_state.client


class PeerWatch:
  """Inside this context, a process of the group that falls silent ends this one: one
  `error:` line naming it, its host and the newest checkpoint, and PEER_LOST_EXIT_CODE.

  Our own watch, because JAX's runtime ends the others with an abort (SIGABRT and a C++
  stack dump) when the coordination service misses a process's heartbeats, and offers no
  usable alternative in jaxlib 0.10: the client's `missed_heartbeat_callback` cannot call
  Python (converting its absl::Status fails with std::bad_cast), and
  `jax_enable_recoverability` leaves the others blocked in their collectives on CPU and
  lets process 0 stop the service at the end of a run before the others have shut down
  (which aborts them). So each process bumps a counter in the service's key-value store; a process whose
  counter stands still for `timeout` seconds is lost, and this one ends before the
  runtime's heartbeat timeout (twice as long) would abort it. The loss of process 0,
  which hosts the service, still ends the others with the runtime's abort: they lose
  the service at once.
  """

  def __init__(self, timeout: float, checkpoints: str | None):
    self._client, self._me = client(), jax.process_index()
    self._peers = [p for p in range(jax.process_count()) if p != self._me]
    self._timeout, self._checkpoints = timeout, checkpoints
    self._interval = min(5.0, max(0.5, timeout / 5))
    self._changes = {p: 0 for p in self._peers}  # how often each one's counter has moved
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="PeerWatch", daemon=True)

  def __enter__(self) -> "PeerWatch":
    self._client.key_value_set(f"{_KEYS}host/{self._me}", socket.gethostname(),
                               allow_overwrite=True)
    self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None and issubclass(exc_type, JaxRuntimeError):
      self._wait_for_verdict()
    self._done.set()
    # Ended before Python's exit, which would kill it inside a call into the runtime
    # (an abort).
    self._thread.join(self._interval + 30)

  def _wait_for_verdict(self) -> None:
    """A collective fails at once when a process it waits for dies (gloo: "Connection
    reset by peer"), before the watch can tell that process is lost: waits until the
    watch has ended this process, or every other process has moved its counter twice
    since (once could be a move from before the failure), so the error is not a loss."""
    since = dict(self._changes)
    deadline = time.monotonic() + self._timeout + 2 * self._interval
    while time.monotonic() < deadline and self._thread.is_alive():
      if all(self._changes[p] >= since[p] + 2 for p in self._peers):
        return
      time.sleep(0.1)

  def _watch(self) -> None:
    heard = {p: (None, time.monotonic()) for p in self._peers}  # counter, when it changed
    beat = 0
    while not self._done.wait(self._interval):
      beat += 1
      try:
        self._client.key_value_set(f"{_KEYS}beat/{self._me}", str(beat), allow_overwrite=True)
        beats = dict(self._client.key_value_dir_get(f"{_KEYS}beat/"))
        gone = dict(self._client.key_value_dir_get(f"{_KEYS}gone/"))
      except JaxRuntimeError:  # the service went with process 0: the runtime ends this one
        return
      now = time.monotonic()
      for p in self._peers:
        if beats.get(f"{_KEYS}beat/{p}") != heard[p][0]:
          heard[p] = (beats.get(f"{_KEYS}beat/{p}"), now)
          self._changes[p] += 1
      silent = [p for p in self._peers if now - heard[p][1] > self._timeout]
      if (silent or gone) and not self._done.is_set():
        self._end(silent[0] if silent else int(next(iter(gone.values()))), silent)

  def _end(self, lost: int, silent: list[int]) -> None:
    """Tells the other processes, waits for them to end first if this is process 0 (its
    exit takes the coordination service along), then ends this process with one line."""
    host = ""
    try:
      self._client.key_value_set(f"{_KEYS}gone/{self._me}", str(lost), allow_overwrite=True)
      host = f" (host {self._client.key_value_try_get(f'{_KEYS}host/{lost}')})"
      if self._me == 0:
        self._wait_until_gone([p for p in self._peers if p not in silent])
    except JaxRuntimeError:
      pass
    message = (f"error: process {lost}{host} was lost (no sign of life for {self._timeout:g} s); "
               f"{self._restart()}\n")
    logging.flush()
    os.write(2, message.encode())
    # Not sys.exit: the main thread may wait forever in a collective with the lost process,
    # and JAX's shutdown at exit would wait for it too.
    os._exit(PEER_LOST_EXIT_CODE)  # pylint: disable=protected-access

  def _wait_until_gone(self, peers: list[int]) -> None:
    deadline = time.monotonic() + self._timeout
    while time.monotonic() < deadline:
      gone = {key for key, _ in self._client.key_value_dir_get(f"{_KEYS}gone/")}
      if all(f"{_KEYS}gone/{p}" in gone for p in peers):
        return
      time.sleep(0.1)

  def _restart(self) -> str:
    """Where the same command continues: the newest checkpoint orbax has finalised."""
    steps = []
    if self._checkpoints and os.path.isdir(self._checkpoints):
      steps = ocp.utils.checkpoint_steps(self._checkpoints)
    if not steps:
      return "no checkpoint yet: the same command on every process starts the run again"
    return (f"the same command on every process restarts the run from checkpoint "
            f"{max(steps)}")
