"""Preemption: SIGTERM or SIGINT asks the loop to stop after its current step.

The loop then writes a checkpoint and exits 0, and the same command resumes. With
several processes the request is shared every `sync_every` steps (a small collective),
so all processes stop after the same step. A second signal stops at once.
"""

import signal
import threading

from absl import logging

from medseg_jax.parallel import multihost

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
  """A context that turns SIGTERM/SIGINT into a flag the training loop polls."""

  def __init__(self, multi_process: bool, sync_every: int = 10):
    self.multi_process, self.sync_every = multi_process, sync_every
    self.signal_name: str | None = None
    self._previous: dict = {}

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: stopping after this step with a checkpoint "
                    "(send it again to stop at once)", self.signal_name)
    for s, handler in self._previous.items():  # a second signal acts as usual
      signal.signal(s, handler)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if not self.multi_process:
      return self.signal_name is not None
    if step % self.sync_every:
      return False
    return multihost.any_process(self.signal_name is not None)
