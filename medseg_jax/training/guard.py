"""The divergence guard: stops training before a diverged state reaches a checkpoint.

Steps hand their loss and gradient norm over as device arrays, so watching costs no
synchronisation; `check` reads them on the host, and the loop calls it before every
checkpoint and every logged record.
"""

import math
from typing import Callable

import numpy as np

from medseg_jax.parallel import multihost
from medseg_jax.errors import MedsegError


class Diverged(MedsegError):
  """Training diverged; the checkpoints on disk predate it. Exit code 1."""


class DivergenceGuard:
  """Raises `Diverged` on a non-finite loss or gradient norm, or on a loss above
  `factor` times its running minimum for `patience` consecutive steps (factor 0: off)."""

  def __init__(self, factor: float, patience: int, learning_rate: Callable[[int], float]):
    self.factor, self.patience, self.learning_rate = factor, patience, learning_rate
    self.minimum, self.above = math.inf, 0
    self._pending: list[tuple[int, object, object]] = []

  def observe(self, step: int, metrics: dict) -> None:
    """Records the metrics of the step that produced state `step`."""
    self._pending.append((step, metrics["loss"], metrics["grad_norm"]))

  def check(self) -> None:
    """Reads the steps observed since the last check; raises `Diverged` at the first bad one."""
    if not self._pending:
      return
    steps = [s for s, _, _ in self._pending]
    values = np.asarray(multihost.to_host([[loss, norm] for _, loss, norm in self._pending]),
                        np.float64)
    self._pending = []
    for step, (loss, norm) in zip(steps, values):
      self._check_step(step, loss, norm)

  def _check_step(self, step: int, loss: float, norm: float) -> None:
    if not (np.isfinite(loss) and np.isfinite(norm)):
      self._fail(step, f"loss {loss:.4g}, gradient norm {norm:.4g}: not finite")
    self.minimum = min(self.minimum, loss)
    if not self.factor:
      return
    self.above = self.above + 1 if loss > self.factor * self.minimum else 0
    if self.patience and self.above >= self.patience:
      self._fail(step, f"loss {loss:.4g} above {self.factor:g} x its minimum "
                       f"{self.minimum:.4g} for {self.above} steps "
                       "(train.divergence_factor, train.divergence_patience)")

  def _fail(self, step: int, what: str) -> None:
    lr = float(self.learning_rate(step - 1))
    raise Diverged(f"training diverged at step {step} (learning rate {lr:.4g}): {what}; "
                   "no checkpoint was written after it")
