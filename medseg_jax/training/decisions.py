"""The training loop's decisions, as pure functions of counters: unit-tested in-process."""

import dataclasses
import enum

from medseg_jax.data import loader


class Stop(enum.Enum):
  """Why training stops before its last step (NONE: it does not)."""

  NONE = "none"
  EARLY_STOPPING = "early stopping"
  SIGNAL = "a stop signal"
  PLUGIN = "a plugin's request"


@dataclasses.dataclass(frozen=True)
class Position:
  """Where the loader stands: `offset` draws into the order of epoch `epoch`."""

  epoch: int = 0
  offset: int = 0


def periodic(step: int, every: int) -> bool:
  """Every `every` steps (0: never): the checkpoint cadence."""
  return bool(every and step % every == 0)


def due(step: int, every: int, last_step: int) -> bool:
  """Whether a periodic action (log, validation) runs after `step`: every `every` steps
  (0: never) and after the last step."""
  return periodic(step, every) or step == last_step


def plateaued(step: int, best_step: int | None, patience: int, eval_every: int) -> bool:
  """Early stopping: `patience` validations since the best one without a better Dice."""
  return bool(patience and best_step is not None and step - best_step >= patience * eval_every)


def stop_reason(requested: Stop, step: int, best_step: int | None, patience: int,
                eval_every: int, validated: bool) -> Stop:
  """Why to stop after `step`: a request first (a stop signal or a plugin's, `requested`),
  then early stopping, which is decided only right after a validation."""
  if requested is not Stop.NONE:
    return requested
  if validated and plateaued(step, best_step, patience, eval_every):
    return Stop.EARLY_STOPPING
  return Stop.NONE


def renumbered_step(position: Position, steps_per_epoch: int, global_batch: int) -> int:
  """The step that reaches `position` at `global_batch` slices per step: how a checkpoint
  saved at another global batch (device count) continues at the same point of training."""
  return position.epoch * steps_per_epoch + position.offset // global_batch


def after_step(position: Position, global_batch: int, epoch_draws: int) -> Position:
  """The loader position after one more step; an epoch (of `epoch_draws` slices,
  `loader.epoch_length`) ends when no full batch is left (`loader.batch_starts`)."""
  return epoch_start(Position(position.epoch, position.offset + global_batch), global_batch,
                     epoch_draws)


def epoch_start(position: Position, global_batch: int, epoch_draws: int) -> Position:
  """`position`, or the start of the next epoch when its epoch has no full batch left."""
  if not loader.batch_starts(position.offset, global_batch, epoch_draws):
    return Position(position.epoch + 1, 0)
  return position
