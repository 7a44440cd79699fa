"""The training loop's decisions, checked against hand-worked schedules."""

from configs import base
from medseg_jax.training import decisions
from medseg_jax.training.decisions import Position, Stop
import helpers


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


def test_renumbering_for_another_global_batch_reaches_the_same_loader_position():
  # 8 devices x 2 = 16 per step over 100 slices: 6 steps per epoch. Stopped at epoch 1
  # after 3 steps (offset 48). On 2 devices (batch 4, 25 steps per epoch) that is step 37.
  assert decisions.renumbered_step(Position(1, 48), 25, 4) == 37
  assert decisions.renumbered_step(Position(0, 0), 25, 4) == 0
  assert decisions.renumbered_step(Position(2, 47), 25, 4) == 61   # a partial batch rounds down


def test_the_loader_position_moves_by_a_global_batch_and_wraps_when_no_batch_is_left():
  # 10 slices, batch 4: two full batches per epoch, the last 2 slices are dropped.
  assert decisions.after_step(Position(0, 0), 4, 10) == Position(0, 4)
  assert decisions.after_step(Position(0, 4), 4, 10) == Position(1, 0)
  assert decisions.after_step(Position(3, 0), 5, 10) == Position(3, 5)
  assert decisions.after_step(Position(3, 5), 5, 10) == Position(4, 0)


def test_renumbering_counts_epochs_of_samples_per_epoch_draws():
  # 100 slices, 300 draws per epoch. 8 devices x 2 = 16 per step: 18 steps per epoch
  # (288 draws, 12 dropped); 2 devices x 2 = 4 per step: 75 steps per epoch.
  cfg = base.get_config()
  cfg.train.per_device_batch_size = 2
  cfg.data.augment.samples_per_epoch = 300
  eight, two = helpers.epoch_plan(cfg, 100, 8), helpers.epoch_plan(cfg, 100, 2)
  assert (eight.steps_per_epoch, two.steps_per_epoch) == (18, 75)
  position = Position()
  for _ in range(18 + 3):  # one epoch and 3 steps on 8 devices
    position = decisions.after_step(position, 16, eight.epoch_draws)
  assert position == Position(1, 48)  # the epoch wrapped after 288 draws, not 96 or 100
  assert decisions.renumbered_step(position, two.steps_per_epoch, 4) == 87  # 75 + 48 / 4


def test_checkpoint_cadence_follows_every_steps():
  assert [s for s in range(1, 10) if decisions.periodic(s, 3)] == [3, 6, 9]
  assert not any(decisions.periodic(s, 0) for s in range(1, 10))
