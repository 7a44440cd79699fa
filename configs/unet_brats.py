"""U-Net on Decathlon Task01_BrainTumour, the thesis's brain-tumour setting.

configs/thesis.py says where each shared value comes from; the values set here say so on
their line: "thesis" (with the part of the thesis) or "ours" (with the reason).
"""

from configs import thesis
from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  thesis.unet(c)
  thesis.brain_tumour(c)
  c.data.image_size = 240                # ours: the thesis gives no brain slice size;
                                         # Decathlon's own 240x240, so nothing is resized
  thesis.training(c, per_device_batch=7, epochs=100, lr=1e-5)  # thesis, training settings
  return c
