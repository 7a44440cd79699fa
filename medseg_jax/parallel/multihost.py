"""Host-side helpers for several processes: barriers, agreement, gathering to numpy."""

import threading
from typing import Any

import jax
import numpy as np
from jax.errors import JaxRuntimeError
from jax.experimental import multihost_utils

from medseg_jax.errors import MedsegError, first_line
from medseg_jax.parallel import distributed


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier called `name`."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array, whole, on every process."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree: Any) -> Any:
  """Copies replicated arrays (including ones spread over several hosts) to numpy."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a collective: all processes call it)."""
  return bool(np.any(all_processes(np.array([flag]))))


def all_processes(values: np.ndarray) -> np.ndarray:
  """`values` of every process stacked along a new first axis (process order); each
  process passes the same shape and dtype. A collective: every process calls it at the
  same point of its program, which orders it among the others."""
  if jax.process_count() == 1:
    return np.asarray(values)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(values)))


class SharedStop:
  """A stop that any process may ask for at any time and every process makes after the
  same step, agreed through JAX's coordination service (its key-value store and a
  barrier), without device work: no process waits behind its queued steps.

  `ask(reason)` publishes the request; the loop calls `reached(step)` after each of its
  steps, every step in order from `start_step + 1`. On the request, a thread in each
  process takes the lock that `reached` needs, publishes the last step its loop checked,
  waits until every process has, and sets the target: the largest plus one.

  The same step everywhere: a loop cannot check a step while its thread holds the lock,
  so each published step was checked (and answered False) and lies below the target;
  each loop then checks every step up to the target and stops there.
  No deadlock: the threads wait only for each other (the barrier), never for a loop; a
  loop holds the lock only to compare two numbers, never across a device call, so
  whatever a loop waits for (a result that needs another process's next dispatch), its
  thread still publishes. A loop that has ended (its last step, or early stopping on
  every process) leaves its thread answering until every loop has ended: the target is
  then past the end, where every process stops anyway.

  Not `multihost_utils.reached_preemption_sync_point`, which runs this protocol in C++:
  it hears only SIGTERM, through a C handler that the loop's Python handler (SIGINT, the
  signal's name in the log, a second signal) replaces; and orbax's CheckpointManager
  feeds it too, from process 0's finalize thread with the step of the checkpoint being
  finalised, which can move the target behind a loop that then never stops.
  """

  _BARRIER_MS = 300_000

  def __init__(self, start_step: int, name: str = "stop"):
    """`name` keeps the keys of one stop apart from another's in the same process group."""
    self._client, self._me, self._count = (distributed.client(), jax.process_index(),
                                           jax.process_count())
    self._keys = f"medseg/{name}/"
    self._lock = threading.Lock()
    self._checked, self._target = start_step, None
    self._error: str | None = None
    self.reason: str | None = None
    self._abandoned = threading.Event()
    # Not a daemon: Python waits for it before JAX's shutdown at exit, instead of killing
    # it inside a call into the runtime (which aborts the process).
    self._thread = threading.Thread(target=self._listen, name="SharedStop")

  def __enter__(self) -> "SharedStop":
    self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    """This loop has ended; its thread answers the others until every loop has, or
    until the next second if the loop ended with an error (the run ends anyway)."""
    if exc_type is not None:
      self._abandoned.set()
    try:
      self._client.key_value_set(f"{self._keys}ended/{self._me}", str(self._checked))
    except JaxRuntimeError:
      self._abandoned.set()  # the service is gone: the run ends anyway

  def ask(self, reason: str) -> None:
    """Asks every process to stop, once; safe in a signal handler (takes no lock)."""
    try:
      self._client.key_value_set(self._keys + "request", reason)
    except JaxRuntimeError:
      pass  # another process asked first, or the service is gone

  def reached(self, step: int) -> bool:
    """Whether to stop after `step`, which the loop has just finished."""
    with self._lock:
      if self._error:
        raise MedsegError(f"the processes could not agree on a step to stop after: "
                          f"{self._error}")
      self._checked = step
      return step == self._target

  def _listen(self) -> None:
    """Agrees on the target once asked."""
    if not self._wait_for_request():
      return
    with self._lock:
      try:
        self._target = self._agree()
      except JaxRuntimeError as e:
        self._error = first_line(e)

  def _wait_for_request(self) -> bool:
    """Whether a stop was asked; False once every loop has ended without one (a request
    asked before its asker's loop ended still counts), or this one with an error."""
    while not self._abandoned.is_set():
      try:
        self.reason = self._client.blocking_key_value_get(self._keys + "request", 1000)
        return True
      except JaxRuntimeError:  # not asked within the second
        pass
      try:
        if len(self._client.key_value_dir_get(self._keys + "ended/")) == self._count:
          self.reason = self._client.key_value_try_get(self._keys + "request")
          return True
      except JaxRuntimeError:  # not asked at all, or the service is gone
        return False
    return False

  def _agree(self) -> int:
    """Publishes this loop's last checked step; the largest of every process's, plus one."""
    self._client.key_value_set(f"{self._keys}checked/{self._me}", str(self._checked))
    self._client.wait_at_barrier(self._keys + "agreed", self._BARRIER_MS)
    steps = self._client.key_value_dir_get(self._keys + "checked/")
    return max(int(value) for _, value in steps) + 1
