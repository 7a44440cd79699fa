"""The divergence guard on hand-made loss sequences."""

import numpy as np
import pytest

from medseg_jax.training.guard import Diverged, DivergenceGuard


def _guard(factor=0.0, patience=0):
  return DivergenceGuard(factor, patience, learning_rate=lambda step: 0.5 * (step + 1))


def _feed(guard, losses, norms=None, first_step=1):
  for i, loss in enumerate(losses):
    norm = 1.0 if norms is None else norms[i]
    guard.observe(first_step + i, {"loss": np.float32(loss), "grad_norm": np.float32(norm)})


def test_finite_losses_pass():
  guard = _guard(factor=10, patience=3)
  _feed(guard, [2.0, 1.5, 1.0, 0.9, 1.2])
  guard.check()
  assert guard.minimum == pytest.approx(0.9)


@pytest.mark.parametrize("loss,norm", [(np.nan, 1.0), (np.inf, 1.0), (1.0, np.nan)])
def test_a_non_finite_step_is_named_with_its_learning_rate(loss, norm):
  guard = _guard()
  _feed(guard, [1.0, 1.0, loss, np.nan], [1.0, 1.0, norm, np.nan])
  with pytest.raises(Diverged, match=r"diverged at step 3 \(learning rate 1.5\): .*not finite"):
    guard.check()


def test_a_loss_above_factor_times_minimum_for_patience_steps():
  guard = _guard(factor=4, patience=3)
  _feed(guard, [1.0, 0.25, 1.1, 1.2, 0.9, 1.5, 1.6])  # 0.9 is below 4 x 0.25: the count restarts
  guard.check()
  _feed(guard, [1.7], first_step=8)
  with pytest.raises(Diverged, match=r"step 8 .*above 4 x its minimum 0.25 for 3 steps"):
    guard.check()


def test_factor_zero_checks_only_finiteness():
  guard = _guard(factor=0, patience=1)
  _feed(guard, [0.01, 100.0, 1e6])
  guard.check()
