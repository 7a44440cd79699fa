"""The divergence guard: stops training before a diverged state reaches a checkpoint.

Steps hand their loss and gradient norm over as device arrays, so watching costs no
synchronisation; `check` reads them on the host, and the loop calls it before every
checkpoint and every logged record.
"""

import collections
import math
from typing import Callable

import numpy as np

from medseg_jax.parallel import multihost
from medseg_jax.errors import MedsegError


class Diverged(MedsegError):
  """Training diverged; the checkpoints on disk predate it. Exit code 1."""

  # How its message starts: the tools that run training as processes recognise a
  # diverged run by its error line.
  PREFIX = "training diverged at step"


class DivergenceGuard:
  """Raises `Diverged` on a non-finite loss or gradient norm, or when the mean loss of the
  last `patience` steps exceeds `factor` times the lowest such mean so far (factor 0: off).

  Means, not single steps: at small batches one batch of nearly empty slices can have a
  loss a hundred times below the typical one, and would make any later step look diverged.
  """

  def __init__(self, factor: float, patience: int, learning_rate: Callable[[int], float]):
    self.factor, self.learning_rate = factor, learning_rate
    self.window: collections.deque = collections.deque(maxlen=max(patience, 1))
    self.minimum = math.inf  # the lowest mean over a full window
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
    if not self.factor:
      return
    self.window.append(loss)
    if len(self.window) < self.window.maxlen:
      return
    mean = sum(self.window) / len(self.window)
    if mean > self.factor * self.minimum:
      self._fail(step, f"mean loss {mean:.4g} over the last {len(self.window)} steps above "
                       f"{self.factor:g} x its lowest {self.minimum:.4g} "
                       "(train.divergence_factor, train.divergence_patience)")
    self.minimum = min(self.minimum, mean)

  def _fail(self, step: int, what: str) -> None:
    lr = float(self.learning_rate(step - 1))
    raise Diverged(f"{Diverged.PREFIX} {step} (learning rate {lr:.4g}): {what}; "
                   "no checkpoint was written after it")
