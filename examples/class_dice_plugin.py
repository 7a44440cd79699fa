"""A plugin: early stopping on one class's validation Dice, and a CSV of every class's Dice.

The built-in early stopping (`train.early_stopping_patience`) follows the mean Dice over
classes; on a task where one structure matters most (an enhancing tumour, a small organ)
a run may be better stopped on that class alone. A plugin component of medseg_jax (docs/components.md,
"Your own network, loss and plugins"): it observes the validation metrics, writes a file
and a TensorBoard scalar, and asks the loop to stop by returning a reason.
"""

import csv
import os

from medseg_jax.training.plugins import Plugin


class ClassDiceStop(Plugin):
  """Stops when class `class_index`'s validation Dice has not improved for `patience`
  validations; appends every validation's per-class Dice to WORKDIR/class_dice.csv."""

  def __init__(self, context, class_index: int = 1, patience: int = 3):
    super().__init__(context)
    self.class_index, self.patience = class_index, patience
    self.best, self.since_best = None, 0
    self.path = os.path.join(context.workdir, "class_dice.csv")

  def on_validation(self, step, metrics):
    dice = {row["class"]: row["dice"] for row in metrics["per_class"]}
    new = not os.path.exists(self.path)
    with open(self.path, "a", newline="") as f:
      writer = csv.writer(f)
      if new:
        writer.writerow(["step"] + [f"dice_{c}" for c in sorted(dice)])
      writer.writerow([step] + [dice[c] for c in sorted(dice)])
    value = dice.get(self.class_index)
    if value is None:  # the class is absent from the validation split's truth and prediction
      return None
    self.context.scalar(f"plugin/dice_class{self.class_index}", value, step)
    if self.best is None or value > self.best:
      self.best, self.since_best = value, 0
      return None
    self.since_best += 1
    if self.since_best >= self.patience:
      return (f"class {self.class_index} Dice {value:.4f}, no better than {self.best:.4f} "
              f"for {self.patience} validations")
    return None
