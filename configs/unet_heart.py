"""U-Net on Decathlon Task02_Heart (the left atrium), the thesis's left-atrium setting.

Each value that differs from base.py or that the thesis states says where it comes from:
"thesis" (with the part of the thesis) or "ours" (with the reason, where the thesis
leaves the choice open).
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.name = "unet"                  # thesis, models: U-Net (Ronneberger 2015)
  c.model.base_features = 64             # thesis, models: channels doubling from 64 ...
  c.model.depth = 4                      # thesis, models: ... over four poolings
  c.data.root = "data/Task02_Heart"      # ours: where the Decathlon download is extracted
  c.data.modalities = ("MRI",)           # thesis, use cases: mono-modal cardiac MRI
  c.data.slice_selection = "central"     # ours: the thesis does not say which 70 slices
  c.data.slices_per_volume = 70          # thesis, use cases: 70 slices per volume
  c.data.image_size = 512                # thesis, use cases: resized to 512x512
  # thesis, use cases: rotation in [-45, 45] degrees, zoom in [0.8, 1.2], translation up to
  # 25.6 px; offline there, on the device per step here (ours: no 35,000-slice copy on disk).
  c.data.augment.enabled = True
  c.data.augment.rotation_degrees = 45.0  # thesis, use cases
  c.data.augment.zoom = (0.8, 1.2)       # thesis, use cases
  c.data.augment.translate_pixels = 25.6  # thesis, use cases
  c.data.augment.samples_per_epoch = 35000  # thesis, use cases: an epoch of 35,000 augmented
                                         # slices, so warmup and GreScale keep its lengths
  c.optim.name = "sgd"                   # thesis, training settings: SGD
  c.optim.momentum = 0.9                 # ours: the thesis gives no momentum; the usual 0.9
  c.optim.lr = 2e-5                      # thesis, training settings: base LR 2e-5
  c.lr.scaling = "linear"                # thesis, LR policies: the linear scaling rule
  c.train.per_device_batch_size = 7      # thesis, training settings: 7 per GPU
  c.train.num_epochs = 100               # thesis, training settings: 100 epochs
  c.train.loss = "dice_ce"               # ours: the thesis names no loss; Dice + cross-entropy
                                         # copes with the small atrium share of each slice
  return c
