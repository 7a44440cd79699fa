"""3D U-Net on Decathlon Task01_BrainTumour: the thesis's brain-tumour data (T1w, every
tumour label against background) trained in 3D on patches.

configs/thesis.py says where each shared value comes from; the values set here say so on
their line: "thesis" (with the part of the thesis) or "ours" (with the reason).
"""

from configs import thesis
from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  thesis.brain_tumour(c)
  thesis.unet3d(c, patch=(128, 128, 128))  # ours: nnU-Net's BraTS patch (1 mm voxels)
  thesis.augment3d(c)                    # ours: nnU-Net augments; the thesis's 2D brain
                                         # runs did not
  return c
