"""The training loop's decisions, as pure functions of counters: unit-tested in-process."""

import enum


class Stop(enum.Enum):
  """Why training stops before its last step (NONE: it does not)."""

  NONE = "none"
  EARLY_STOPPING = "early stopping"
  SIGNAL = "a stop signal"
  PLUGIN = "a plugin's request"


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
