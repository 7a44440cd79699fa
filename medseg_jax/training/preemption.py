"""Preemption: SIGTERM or SIGINT asks the loop to stop after its current step.

The loop then writes a checkpoint and exits 0, and the same command resumes. With
several processes the request goes to every process through JAX's coordination service
(`multihost.SharedStop`), and all stop after the same step. A second signal stops at once.
"""

import signal
import threading

import jax
from absl import logging

from medseg_jax.parallel import multihost

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """A context that turns SIGTERM/SIGINT into a stop the training loop polls after each
  step; `start_step` is the step the loop starts after."""

  def __init__(self, multi_process: bool, start_step: int = 0):
    self.signal_name: str | None = None
    self._shared = multihost.SharedStop(start_step) if multi_process else None
    self._previous: dict = {}

  def __enter__(self) -> "StopRequest":
    if self._shared is not None:
      self._shared.__enter__()
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    if self._shared is not None:
      self._shared.__exit__(*exc)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: stopping after this step with a checkpoint "
                    "(send it again to stop at once)", self.signal_name)
    for s, handler in self._previous.items():  # a second signal acts as usual
      signal.signal(s, handler)
    if self._shared is not None:
      self._shared.ask(f"{self.signal_name} to process {jax.process_index()}")

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if self._shared is None:
      return self.signal_name is not None
    return self._shared.reached(step)

  @property
  def reason(self) -> str | None:
    """What asked for the stop: this process's signal, or another process's."""
    if self.signal_name or self._shared is None:
      return self.signal_name
    return self._shared.reason
