"""GreScale settings for 8 devices chosen by medseg_jax.tuning.guideline (run
04_increase_decay_coefficient: actions exhausted before reaching the baseline).

The source config and the guideline's changes to it: the tuner's command-line overrides
and the chosen run's settings.
"""

import importlib.util
import os

SOURCE = '../../../../../configs/large_batch_contrast_fcn.py'  # relative to this file
VARIANT = None  # get_config(VARIANT) of the source when set
CHANGES = {'lr.grescale.decay_coefficient': 0.3,
           'lr.policy': 'grescale',
           'parallel.num_devices': 8}


def get_config():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), SOURCE)
  spec = importlib.util.spec_from_file_location("guideline_source", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(VARIANT) if VARIANT else module.get_config()
  for key, value in CHANGES.items():
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      node = node[part]
    node[leaf] = value
  return c
