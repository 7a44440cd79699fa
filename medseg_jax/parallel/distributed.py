"""Multi-process start-up: jax.distributed, local devices and GPU memory, before JAX runs.

Where the process group comes from, in this order: explicit flags
(--coordinator_address, --num_processes, --process_id); SLURM's environment; Open
MPI's environment (OMPI_COMM_WORLD_*); otherwise a single process. JAX's own
distributed runtime (a coordinator plus gloo collectives on CPU, NCCL on GPU)
carries the training.

`JoinDeadline` (joining) and `PeerWatch` (the run) end a process whose group did not form,
or whose peer was lost or failed, with one line and exit code `PEER_LOST_EXIT_CODE`,
instead of the runtime's abort; `ending` orders the processes' exits so that none aborts.
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
from medseg_jax.parallel import ending

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
  kwargs = dict(initialization_timeout=runtime_timeout(timeout_seconds),
                heartbeat_timeout_seconds=2 * runtime_timeout(timeout_seconds),
                shutdown_timeout_seconds=ending.SHUTDOWN_BARRIER_SECONDS)
  if launch.source == "flags":
    if launch.process_id != 0:  # process 0 starts the coordinator; the others must reach it
      wait_for_coordinator(launch.coordinator_address, timeout_seconds)
    kwargs.update(coordinator_address=launch.coordinator_address,
                  num_processes=launch.num_processes, process_id=launch.process_id)
  try:
    with JoinDeadline(timeout_seconds, launch, checkpoints):
      jax.distributed.initialize(local_device_ids=local_device_ids, **kwargs)
  except Exception as e:  # the runtime raises several types; all mean "no process group"
    raise MedsegError(f"jax.distributed ({launch.source}) could not start: "
                      f"{first_line(e)}") from e
  ending.last_out_at_exit(client(), timeout_seconds)
  logging.info("Process %d of %d (%s), %d local devices of %d", jax.process_index(),
               jax.process_count(), launch.source, jax.local_device_count(),
               jax.device_count())
  return PeerWatch(timeout_seconds, checkpoints)


def runtime_timeout(timeout_seconds: float) -> int:
  """The runtime's own bound on joining, and half its heartbeat timeout: later than ours.

  Each of the runtime's bounds ends a process with an abort when it expires (connecting:
  the failed registration calls the missed-heartbeat callback; heartbeats: the service
  tells every process that one is dead, and each one's callback aborts it). Its heartbeats
  go every half timeout, so it can declare a process dead half a timeout after its death.
  Our bounds (`JoinDeadline`, `PeerWatch`: `timeout_seconds` plus at most 2 polls of 5 s)
  end the process with one line first, by 20 s at least.
  """
  return int(timeout_seconds) + 30


def client() -> Any:
  """The process group's client of JAX's coordination service (its key-value store and
  barriers). JAX keeps it in a private module; orbax reads it from there too."""
  return jax_distributed.global_state.client


class JoinDeadline:
  """Inside this context (joining the group), a group that has not formed within
  `timeout` seconds ends this process with one `error:` line and PEER_LOST_EXIT_CODE.

  The runtime's own deadline (`runtime_timeout`, later) would abort it: a failed
  registration (its RegisterTask waits for every process) calls the client's
  missed-heartbeat callback, a fatal log and SIGABRT. The main thread is inside that C++
  call, so a thread of ours ends the process.
  """

  def __init__(self, timeout: float, launch: Launch, checkpoints: str | None):
    self._timeout, self._launch, self._checkpoints = timeout, launch, checkpoints
    self._joined = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="JoinDeadline", daemon=True)

  def __enter__(self) -> "JoinDeadline":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._joined.set()

  def _watch(self) -> None:
    if self._joined.wait(self._timeout):
      return
    group = f"of {self._launch.num_processes} processes " if self._launch.num_processes else ""
    where = f" at {self._launch.coordinator_address}" if self._launch.coordinator_address else ""
    logging.flush()
    # Nobody else to tell: the group never formed, so no process is connected to this one.
    os.write(2, (f"error: the group {group}did not form{where} within {self._timeout:g} s "
                 f"(a process was not started, or ended before joining); "
                 f"{restart_hint(self._checkpoints)}\n").encode())
    os._exit(PEER_LOST_EXIT_CODE)  # pylint: disable=protected-access


class PeerWatch:
  """Inside this context, a process of the group that falls silent or fails ends this one:
  one `error:` line naming it, its host and the newest checkpoint, and
  PEER_LOST_EXIT_CODE; leaving this context with an error tells the others this one
  failed.

  Our own watch, because JAX's runtime ends the others with an abort (a C++ stack dump and
  SIGABRT) when the coordination service misses a process's heartbeats, and offers no
  usable alternative in jaxlib 0.10: the client's `missed_heartbeat_callback` cannot call
  Python (converting its absl::Status fails with std::bad_cast), and
  `jax_enable_recoverability` leaves the others blocked in their collectives on CPU. So
  each process bumps a counter in the service's key-value store; a process whose counter
  stands still for `timeout` seconds is lost. A poll every `timeout / 5` seconds (at most
  5) notices it within `timeout` plus two polls of its death, well before the runtime's
  heartbeat check can (`runtime_timeout`). A process that fails with its own error says
  so under `failed/`, and the others end at their next poll, naming its error. Each ends
  through `ending.end_process`, in the order in which no process aborts.

  The loss of process 0, which hosts the service, still ends the others with the
  runtime's abort: their clients' error polls fail at once when its sockets close, and
  the abort comes from the runtime's thread before any of ours can act. The launchers
  start each process through launch/process.sh, which turns that abort into one line
  and exit code 75.
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
    if exc_type is not None:
      self._announce_failure(exc)
    # Ended before Python's exit, which would kill it inside a call into the runtime
    # (an abort).
    self._thread.join(self._interval + 30)

  def _announce_failure(self, exc: BaseException) -> None:
    """Tells the others this process leaves the run with an error (they end at their next
    poll); it then exits as usual, with its own error line."""
    try:
      self._client.key_value_set(f"{_KEYS}failed/{self._me}", first_line(exc),
                                 allow_overwrite=True)
    except JaxRuntimeError:
      pass  # the service is gone: so are the others

  def _wait_for_verdict(self) -> None:
    """A collective fails at once when a process it waits for dies (gloo: "Connection
    reset by peer"), before the watch can tell that process is lost: waits until the
    watch has ended this process, or every other process has moved its counter twice
    since (once could be a move from before the failure), so the error is not a loss.
    No deadline of its own: the watch decides within its bound, or has returned because
    the service is gone."""
    since = dict(self._changes)
    while self._thread.is_alive():
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
        failed = {int(key.rsplit("/", 1)[1]): error for key, error
                  in self._client.key_value_dir_get(f"{_KEYS}failed/")}
      except JaxRuntimeError:  # the service went with process 0: the runtime ends this one
        return
      now = time.monotonic()
      for p in self._peers:
        if beats.get(f"{_KEYS}beat/{p}") != heard[p][0]:
          heard[p] = (beats.get(f"{_KEYS}beat/{p}"), now)
          self._changes[p] += 1
      silent = tuple(p for p in self._peers if now - heard[p][1] > self._timeout)
      if self._done.is_set():
        return
      failed.pop(self._me, None)  # this one's own failure, announced as its loop ended
      if failed:
        peer, error = next(iter(failed.items()))
        self._end(peer, f"failed: {error}", silent)
      if silent or gone:
        self._end(silent[0] if silent else int(next(iter(gone.values()))),
                  f"was lost (no sign of life for {self._timeout:g} s)", silent)

  def _end(self, peer: int, what: str, silent: tuple[int, ...]) -> None:
    """Tells the others (a loss not every one may have seen yet), then ends this process
    with one line."""
    host = ""
    try:
      self._client.key_value_set(f"{_KEYS}gone/{self._me}", str(peer), allow_overwrite=True)
      host = f" (host {self._client.key_value_try_get(f'{_KEYS}host/{peer}')})"
    except JaxRuntimeError:
      pass
    ending.end_process(self._client, self._timeout,
                       f"error: process {peer}{host} {what}; {restart_hint(self._checkpoints)}\n",
                       PEER_LOST_EXIT_CODE, silent)


def restart_hint(checkpoints: str | None) -> str:
  """Where the same command continues: the newest checkpoint orbax has finalised in the
  directory `checkpoints`."""
  steps = []
  if checkpoints and os.path.isdir(checkpoints):
    steps = ocp.utils.checkpoint_steps(checkpoints)
  if not steps:
    return "no checkpoint yet: the same command on every process starts the run again"
  return f"the same command on every process restarts the run from checkpoint {max(steps)}"
