"""The guideline's actions: each maps the GreScale settings tried so far to the next ones.

The settings an action changes are config keys: `optim.lr` (the base LR eta, GreScale's
"initial LR"), the decay coefficient, the warmup and decay lengths, and the optimizer.
Their step sizes are the tuner's settings (`guideline_settings.Settings`).
"""

from typing import Callable

import ml_collections

from medseg_jax import optim
from medseg_jax.errors import ConfigError
from medseg_jax.tuning import report
from medseg_jax.tuning.guideline_settings import Settings

# The settings the actions change, as config keys. The thesis's "initial LR" is the base
# LR eta that the linear rule scales: lowering it lowers the whole GreScale schedule.
INITIAL_LR, DECAY_COEFFICIENT = "optim.lr", "lr.grescale.decay_coefficient"
WARMUP, DECAY_EPOCHS, OPTIMIZER = ("lr.grescale.warmup_epochs", "lr.grescale.decay_epochs",
                                   "optim.name")
Params = dict[str, float | str]


def _round(x: float) -> float:
  """Keeps repeated steps readable (0.1 + 0.1 + 0.1 = 0.3, not 0.30000000000000004)."""
  return float(f"{x:.10g}")


def _epochs(cfg: ml_collections.ConfigDict) -> float | None:
  """Training epochs, unless the length is given in steps (epochs unknown before a run)."""
  return None if cfg.train.num_steps else float(cfg.train.num_epochs)


def decay_epochs(params: Params, cfg: ml_collections.ConfigDict) -> float:
  """The decay length in epochs (`optim.grescale_decay_epochs` for a 0 in the config)."""
  if params[DECAY_EPOCHS]:
    return float(params[DECAY_EPOCHS])
  epochs = _epochs(cfg)
  if epochs is None:
    raise ConfigError(f"train.num_steps={cfg.train.num_steps}: increase_decay_period needs "
                      "lr.grescale.decay_epochs set (the epochs are unknown before a run)")
  return optim.grescale_decay_epochs(0.0, epochs)


def _fits(params: Params, cfg: ml_collections.ConfigDict) -> bool:
  """Warmup and decay leave room in the run (the stabilisation may shrink to nothing)."""
  epochs = _epochs(cfg)
  return epochs is None or params[WARMUP] + decay_epochs(params, cfg) <= epochs


def _decrease_initial_lr(params: Params, cfg, g: Settings, tries: int) -> Params | None:
  return {**params, INITIAL_LR: _round(params[INITIAL_LR] * g.initial_lr_factor)}


def _increase_decay_coefficient(params: Params, cfg, g: Settings, tries: int) -> Params | None:
  step = g.decay_coefficient_step
  return {**params, DECAY_COEFFICIENT: _round(params[DECAY_COEFFICIENT] + step)}


def _increase_warmup(params: Params, cfg, g: Settings, tries: int) -> Params | None:
  new = {**params, WARMUP: _round(params[WARMUP] + g.warmup_epochs_step)}
  return new if _fits(new, cfg) else None


def _increase_decay_period(params: Params, cfg, g: Settings, tries: int) -> Params | None:
  new = {**params, DECAY_EPOCHS: _round(decay_epochs(params, cfg) + g.decay_epochs_step)}
  return new if _fits(new, cfg) else None


def _change_optimizer(params: Params, cfg, g: Settings, tries: int) -> Params | None:
  """The next optimizer of `--optimizers` other than the config's own."""
  others = [name for name in g.optimizers if name != cfg.optim.name]
  return {**params, OPTIMIZER: others[tries]} if tries < len(others) else None


# An action maps the best settings so far (with the config and the tuner's settings) and
# how often it has been applied in a row to the next settings to try, or None when it has
# no further step.
Action = Callable[[Params, ml_collections.ConfigDict, Settings, int], Params | None]
ACTIONS: dict[str, Action] = {
    "decrease_initial_lr": _decrease_initial_lr,
    "increase_decay_coefficient": _increase_decay_coefficient,
    "increase_warmup": _increase_warmup,
    "increase_decay_period": _increase_decay_period,
    "change_optimizer": _change_optimizer,
}


def start_params(cfg: ml_collections.ConfigDict) -> Params:
  """The GreScale settings of `cfg` the actions change: the start of the search."""
  g = cfg.lr.grescale
  return {INITIAL_LR: float(cfg.optim.lr), DECAY_COEFFICIENT: float(g.decay_coefficient),
          WARMUP: float(g.warmup_epochs), DECAY_EPOCHS: float(g.decay_epochs),
          OPTIMIZER: cfg.optim.name}


def describe_change(old: Params, new: Params) -> str:
  return "; ".join(f"{k}: {old[k]} → {new[k]}" for k in new if new[k] != old.get(k))


# The actions that change the LR schedule (change_optimizer keeps it).
SCHEDULE_ACTIONS = tuple(a for a in ACTIONS if a != "change_optimizer")


def after_action(cfg: ml_collections.ConfigDict, action: str,
                 settings: Settings = Settings()) -> tuple[ml_collections.ConfigDict, str]:
  """`cfg` after one step of `action` from its own GreScale settings, and what changed;
  the tuner's first trial of that action."""
  if cfg.lr.policy != "grescale":
    raise ConfigError(f"lr.policy={cfg.lr.policy!r}: {action} changes GreScale; "
                      "set --config.lr.policy=grescale")
  params = start_params(cfg)
  new = ACTIONS[action](params, cfg, settings, 0)
  if new is None:
    raise ConfigError(f"{action}: no step left for this config (the warmup and the decay "
                      "would not fit in the run)")
  return report.chosen_config(cfg, new), describe_change(params, new)
