"""Preemption: SIGTERM or SIGINT asks the loop to stop after its current step.

The loop then writes a checkpoint and exits 0, and the same command resumes. A stop
request file (WORKDIR/stop_request, written by the dashboard), which process 0 polls,
acts as a signal does. A plugin asks for a stop the same way (`StopRequest.ask`); the run
then ends as after early stopping. With several processes the request goes to every
process through JAX's coordination service (`multihost.SharedStop`), and all stop after
the same step. A second signal stops at once.
"""

import contextlib
import os
import signal
import threading

import jax
from absl import logging

from medseg_jax.parallel import multihost
from medseg_jax.training.decisions import Stop

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PLUGIN = "plugin: "  # marks a plugin's request among the shared ones (signals are named)
USER = "the user's stop request"  # the stop request file's name among the signals'
POLL_SECONDS = 0.5


class StopRequest:
  """A context that turns SIGTERM/SIGINT into a stop the training loop polls after each
  step; `start_step` is the step the loop starts after."""

  def __init__(self, multi_process: bool, start_step: int = 0,
               request_file: str | None = None):
    """`request_file`: the stop request file process 0 polls."""
    self.signal_name: str | None = None
    self._asked: str | None = None  # a plugin's reason
    self._shared = multihost.SharedStop(start_step) if multi_process else None
    self._previous: dict = {}
    self._file = (_RequestFile(request_file, self._stop_as_signal)
                  if request_file and jax.process_index() == 0 else None)

  def __enter__(self) -> "StopRequest":
    if self._shared is not None:
      self._shared.__enter__()
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    if self._file is not None:
      self._file.start()
    return self

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.halt()
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    if self._shared is not None:
      self._shared.__exit__(*exc)

  def _handle(self, signum, frame) -> None:
    del frame
    for s, handler in self._previous.items():  # a second signal acts as usual
      signal.signal(s, handler)
    self._stop_as_signal(signal.Signals(signum).name)

  def _stop_as_signal(self, name: str) -> None:
    if self.signal_name is not None:
      return
    self.signal_name = name
    logging.warning("%s received: stopping after this step with a checkpoint%s", name,
                    " (send it again to stop at once)" if name != USER else "")
    if self._shared is not None:
      self._shared.ask(f"{name} to process {jax.process_index()}")

  def ask(self, reason: str) -> None:
    """A stop asked by a plugin, with its reason: after this step, or on several processes
    after the step they agree on (the first request of either kind counts)."""
    if self._asked is None:
      self._asked = reason
    if self._shared is not None:
      self._shared.ask(PLUGIN + reason)

  def requested(self, step: int) -> Stop:
    """Whether to stop after `step` and why (a signal, a plugin, or not); the same answer
    on every process."""
    if self._shared is None:
      stop = self.signal_name is not None or self._asked is not None
    else:
      stop = self._shared.reached(step)
    if not stop:
      return Stop.NONE
    return Stop.PLUGIN if (self._agreed_reason or "").startswith(PLUGIN) else Stop.SIGNAL

  @property
  def _agreed_reason(self) -> str | None:
    """The request every process acts on: the first one asked."""
    if self._shared is not None:
      return self._shared.reason
    return self.signal_name or (PLUGIN + self._asked if self._asked else None)

  @property
  def reason(self) -> str | None:
    """What asked for the stop: this process's signal, or the request every process acts
    on (another process's signal, or a plugin's reason)."""
    if self.signal_name:
      return self.signal_name
    reason = self._agreed_reason
    return reason[len(PLUGIN):] if reason and reason.startswith(PLUGIN) else reason


class _RequestFile(threading.Thread):
  """Polls a stop request file every POLL_SECONDS; once it is there, removes it and calls
  `stop(USER)`. (Process 0 removes an earlier run's request as it starts:
  `monitor.run_state.Lifetime`.)"""

  def __init__(self, path: str, stop):
    super().__init__(daemon=True, name="medseg-stop-request")
    self.path, self.stop = path, stop
    self._halt = threading.Event()

  def run(self) -> None:
    while not self._halt.wait(POLL_SECONDS):
      if os.path.exists(self.path):
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.path)
        self.stop(USER)
        return

  def halt(self) -> None:
    self._halt.set()
