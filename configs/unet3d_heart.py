"""3D U-Net on Decathlon Task02_Heart (the left atrium): the thesis's left-atrium data
trained in 3D on patches.

configs/thesis.py says where each shared value comes from; the values set here say so on
their line: "thesis" (with the part of the thesis) or "ours" (with the reason).
"""

from configs import thesis
from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  thesis.left_atrium(c)
  # ours: nnU-Net's 3d_fullres patch for the heart, 80 x 192 x 160 along (S, A, R), here in
  # RAS order; the slices' 512x512 resizing of the 2D configs does not apply in 3D
  thesis.unet3d(c, patch=(160, 192, 80))
  thesis.augment3d(c)                    # ours: the thesis's 2D ranges are per slice
  return c
