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
  assert guard.minimum == pytest.approx((1.0 + 0.9 + 1.2) / 3)  # the lowest 3-step mean


@pytest.mark.parametrize("loss,norm", [(np.nan, 1.0), (np.inf, 1.0), (1.0, np.nan)])
def test_a_non_finite_step_is_named_with_its_learning_rate(loss, norm):
  guard = _guard()
  _feed(guard, [1.0, 1.0, loss, np.nan], [1.0, 1.0, norm, np.nan])
  with pytest.raises(Diverged, match=r"diverged at step 3 \(learning rate 1.5\): .*not finite"):
    guard.check()


def test_a_mean_loss_above_factor_times_the_lowest_mean():
  guard = _guard(factor=4, patience=3)
  # 3-step means: 1.0, 0.75, 0.5, 0.5, 1.0 (lowest 0.5), then 1.9, below 4 x 0.5 = 2 ...
  _feed(guard, [1.0, 1.0, 1.0, 0.25, 0.25, 1.0, 1.75, 2.95])
  guard.check()
  _feed(guard, [3.4], first_step=9)  # ... and (1.75 + 2.95 + 3.4) / 3 = 2.7 > 2
  with pytest.raises(Diverged, match=r"step 9 .*mean loss 2.7 over the last 3 steps above 4 "
                                     r"x its lowest 0.5"):
    guard.check()


def test_one_very_low_batch_is_not_the_minimum():
  """At batch 4, a batch of empty slices scored a loss of 0.0015 among losses near 0.17:
  compared step by step, that stopped a healthy run as diverged."""
  guard = _guard(factor=10, patience=50)
  rng = np.random.default_rng(0)
  losses = rng.uniform(0.1, 0.3, 300)
  losses[40] = 0.0015
  _feed(guard, losses)
  guard.check()


def test_factor_zero_checks_only_finiteness():
  guard = _guard(factor=0, patience=1)
  _feed(guard, [0.01, 100.0, 1e6])
  guard.check()
