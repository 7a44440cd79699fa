"""The guideline tuner's own settings, with their defaults and why; each is also a flag.

They steer the tuner's decisions only, so they live here and not in the experiment
config: a run trained by the tuner depends on the config alone.
"""

import dataclasses
from typing import Callable

from absl import flags


def _setting(default, why: str):
  """A setting's default and why it is that; `why` is also the help of its flag."""
  return dataclasses.field(default=default, metadata={"help": why})


@dataclasses.dataclass(frozen=True)
class Settings:
  """The tuner's own settings (not the experiment config's); each is a flag, --NAME."""

  threshold: int = _setting(12, "Below this many devices, train the GreScale defaults once "
                            "and stop: the thesis's guideline just trains below 12 workers.")
  budget: int = _setting(12, "Settings tried at most, the baseline and the confirmation "
                         "included, each trained once per validation draw: 12 leaves room "
                         "for the GreScale run, each action once, a few repeats and the "
                         "confirming run.")
  actions: tuple[str, ...] = _setting(
      ("decrease_initial_lr", "increase_decay_coefficient", "increase_warmup",
       "increase_decay_period", "change_optimizer"),
      "The actions, in the order they are tried: the thesis's order.")
  comparison: str = _setting(
      "dice_macc_miou", "How runs are compared (dice_macc_miou, dice or mean_iou): Dice, then "
      "mean accuracy, then mean IoU is the thesis's priority; pixel accuracy and fw IoU are "
      "dominated by the background.")
  tolerance: float = _setting(0.002, "Metric differences below this are ties, so noise alone "
                              "does not pick a run.")
  val_draws: int = _setting(
      3, "Validation draws per setting: each setting (the baseline's too) trains once per "
      "draw, on folds 0, 1, ... of the subjects outside the test split (data.fold; each fold "
      "the size of the config's validation split, so every draw trains on as many subjects "
      "as the config; the config's own folds when it sets data.fold), and every comparison "
      "uses the mean over the draws: one draw of a few volumes picks noise. 1 = the config's "
      "split alone.")
  seed: int = _setting(
      100, "Seed of the deciding runs' first draw (draw d: this + d); the confirming runs take "
      "the next seeds after them. Apart from the scaling study's seeds (0, 1, ...), so the "
      "study never tests a setting on a seed that chose it.")
  split: str = _setting("val", "The split whose metrics decide (val or test): validation, so "
                        "the reported test metrics are not selected on.")
  # One fixed step per action and run ("small fixed steps" in the thesis, which gives none).
  initial_lr_factor: float = _setting(
      0.5, "decrease_initial_lr: optim.lr (the base LR eta, so the whole GreScale schedule) x "
      "this per step: halving undoes the linear rule's x8 at 8 devices in three steps.")
  decay_coefficient_step: float = _setting(
      0.1, "increase_decay_coefficient: + this per step (the default coefficient's size: the "
      "first step doubles it).")
  warmup_epochs_step: float = _setting(1.0, "increase_warmup: + this many epochs per step "
                                       "(a fifth of the default 5-epoch warmup).")
  decay_epochs_step: float = _setting(1.0, "increase_decay_period: + this many epochs per "
                                      "step (as the warmup's step, so both periods move "
                                      "alike).")
  optimizers: tuple[str, ...] = _setting(
      ("sgd", "adam", "lars"), "change_optimizer: tried in this order, the config's own "
      "skipped: SGD (the thesis's recommendation), Adam, then LARS (made for large batches).")


_FLAG_TYPES = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
               tuple: flags.DEFINE_list}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> Callable[[], Settings]:
  """Defines a flag per setting, defaulting to `Settings`; returns their reader."""
  holders = {}
  for f in dataclasses.fields(Settings):
    default = list(f.default) if isinstance(f.default, tuple) else f.default  # lists for absl
    holders[f.name] = _FLAG_TYPES[type(f.default)](f.name, default, f.metadata["help"],
                                                   flag_values=flag_values)
  return lambda: Settings(**{name: tuple(h.value) if isinstance(h.value, list) else h.value
                             for name, h in holders.items()})
