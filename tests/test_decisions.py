"""The training loop's decisions, checked against hand-worked schedules."""

from medseg_jax.training import decisions
from medseg_jax.training.decisions import Stop


def test_periodic_actions_run_every_n_steps_and_after_the_last():
  assert [s for s in range(1, 11) if decisions.due(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if decisions.due(s, 0, 10)] == [10]
  assert [s for s in range(1, 6) if decisions.due(s, 1, 5)] == [1, 2, 3, 4, 5]


def test_early_stopping_after_patience_validations_without_a_better_dice():
  # Validation every 5 steps, best at step 10, patience 2: steps 15 and 20 are not better.
  kwargs = dict(best_step=10, patience=2, eval_every=5)
  assert decisions.stop_reason(Stop.NONE, 15, validated=True, **kwargs) is Stop.NONE
  assert decisions.stop_reason(Stop.NONE, 20, validated=True, **kwargs) is Stop.EARLY_STOPPING
  # Only right after a validation, and never with patience 0 or before any best.
  assert decisions.stop_reason(Stop.NONE, 21, validated=False, **kwargs) is Stop.NONE
  assert decisions.stop_reason(Stop.NONE, 20, 10, 0, 5, True) is Stop.NONE
  assert decisions.stop_reason(Stop.NONE, 20, None, 2, 5, True) is Stop.NONE


def test_a_requested_stop_wins_over_early_stopping():
  for requested in (Stop.SIGNAL, Stop.PLUGIN):
    assert decisions.stop_reason(requested, 20, 10, 2, 5, True) is requested
    assert decisions.stop_reason(requested, 3, None, 0, 0, False) is requested


def test_checkpoint_cadence_follows_every_steps():
  assert [s for s in range(1, 10) if decisions.periodic(s, 3)] == [3, 6, 9]
  assert not any(decisions.periodic(s, 0) for s in range(1, 10))
