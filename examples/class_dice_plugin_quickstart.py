"""The quickstart with a plugin: early stopping on class 1's validation Dice (patience 2)
and a CSV of every class's Dice per validation, from examples/class_dice_plugin.py.

  python3 -m medseg_jax.main --config=examples/class_dice_plugin_quickstart.py
"""

import ml_collections

from configs import quickstart


def get_config():
  c = quickstart.get_config()
  c.train.eval_every_steps = 50
  c.train.plugins = ("class_dice_plugin.py:ClassDiceStop",)
  c.train.plugin_kwargs = ml_collections.ConfigDict(
      {"ClassDiceStop": {"class_index": 1, "patience": 2}})
  return c
