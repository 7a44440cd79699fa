"""FCN-8s on Decathlon Task02_Heart (the left atrium), the thesis's left-atrium setting,
from ImageNet VGG-16 (`model.init_from`, a file the user downloads: docs/components.md, "Starting from
pretrained weights"; `--config.model.init_from=""` trains from scratch).

configs/thesis.py says where each value comes from: "thesis" (with the part of the
thesis) or "ours" (with the reason).
"""

from configs import thesis
from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  thesis.fcn(c)
  thesis.left_atrium(c)
  thesis.training(c, per_device_batch=10, epochs=120, lr=3e-5)  # thesis, training settings
  return c
