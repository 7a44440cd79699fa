"""FCN-8s on Decathlon Task01_BrainTumour, the thesis's brain-tumour setting, from ImageNet
VGG-16 (`model.init_from`, a file the user downloads: docs/components.md, "Starting from pretrained
weights"; `--config.model.init_from=""` trains from scratch).

configs/thesis.py says where each shared value comes from; the values set here say so on
their line: "thesis" (with the part of the thesis) or "ours" (with the reason).
"""

from configs import thesis
from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  thesis.fcn(c)
  thesis.brain_tumour(c)
  c.data.image_size = 224                # ours: the thesis gives no brain slice size; FCN-8s
                                         # needs a multiple of 32, and 224 is VGG's own
  thesis.training(c, per_device_batch=10, epochs=120, lr=1e-5)  # thesis, training settings
  return c
