"""Where the loader stands after each step, and the step that reaches a position at another
global batch, checked against hand-worked epochs."""

from medseg_jax import defaults
from medseg_jax.data import loader
from medseg_jax.data.loader import Position
import helpers


def test_renumbering_for_another_global_batch_reaches_the_same_loader_position():
  # 8 devices x 2 = 16 per step over 100 slices: 6 steps per epoch. Stopped at epoch 1
  # after 3 steps (offset 48). On 2 devices (batch 4, 25 steps per epoch) that is step 37.
  assert loader.renumbered_step(Position(1, 48), 25, 4) == 37
  assert loader.renumbered_step(Position(0, 0), 25, 4) == 0
  assert loader.renumbered_step(Position(2, 47), 25, 4) == 61   # a partial batch rounds down


def test_the_loader_position_moves_by_a_global_batch_and_wraps_when_no_batch_is_left():
  # 10 slices, batch 4: two full batches per epoch, the last 2 slices are dropped.
  assert loader.after_step(Position(0, 0), 4, 10) == Position(0, 4)
  assert loader.after_step(Position(0, 4), 4, 10) == Position(1, 0)
  assert loader.after_step(Position(3, 0), 5, 10) == Position(3, 5)
  assert loader.after_step(Position(3, 5), 5, 10) == Position(4, 0)


def test_renumbering_counts_epochs_of_samples_per_epoch_draws():
  # 100 slices, 300 draws per epoch. 8 devices x 2 = 16 per step: 18 steps per epoch
  # (288 draws, 12 dropped); 2 devices x 2 = 4 per step: 75 steps per epoch.
  cfg = defaults.get_config()
  cfg.train.per_device_batch_size = 2
  cfg.data.augment.samples_per_epoch = 300
  eight, two = helpers.epoch_plan(cfg, 100, 8), helpers.epoch_plan(cfg, 100, 2)
  assert (eight.steps_per_epoch, two.steps_per_epoch) == (18, 75)
  position = Position()
  for _ in range(18 + 3):  # one epoch and 3 steps on 8 devices
    position = loader.after_step(position, 16, eight.epoch_draws)
  assert position == Position(1, 48)  # the epoch wrapped after 288 draws, not 96 or 100
  assert loader.renumbered_step(position, two.steps_per_epoch, 4) == 87  # 75 + 48 / 4
