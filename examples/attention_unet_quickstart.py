"""The quickstart trained with a network the package does not have: the Attention U-Net of
examples/attention_unet.py, named by file (relative to this config's directory).

  python3 -m medseg_jax.main --config=examples/attention_unet_quickstart.py
"""

import ml_collections

from configs import quickstart


def get_config():
  c = quickstart.get_config()
  c.model.name = "attention_unet.py:AttentionUNet"
  # To the constructor, beside the framework's num_classes, dtype and axis_name; the
  # built-in networks' keys (model.depth, model.base_features, ...) do not apply.
  c.model.kwargs = ml_collections.ConfigDict({"base_features": 16, "depth": 3})
  return c
