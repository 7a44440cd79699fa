"""U-Net on Decathlon Task02_Heart (the left atrium), the thesis's left-atrium setting.

configs/thesis.py says where each value comes from: "thesis" (with the part of the
thesis) or "ours" (with the reason).
"""

from configs import thesis
from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  thesis.unet(c)
  thesis.left_atrium(c)
  thesis.training(c, per_device_batch=7, epochs=100, lr=2e-5)  # thesis, training settings
  return c
