"""U-Net on Decathlon Task01_BrainTumour, the thesis's brain-tumour setting.

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
  c.data.root = "data/Task01_BrainTumour"  # ours: where the Decathlon download is extracted
  c.data.modalities = ("T1w",)           # thesis, use cases: the T1-weighted modality only
  c.data.label_map = (0, 1, 1, 1)        # ours: the thesis does not group the tumour labels;
                                         # every tumour label vs background
  c.data.slice_selection = "central"     # ours: the thesis does not say which 70 slices
  c.data.slices_per_volume = 70          # thesis, use cases: 70 2D slices per volume
  c.data.image_size = 240                # ours: the thesis gives no brain slice size;
                                         # Decathlon's own 240x240, so nothing is resized
  c.data.augment.enabled = False         # thesis, use cases: no augmentation for the brain
  c.optim.name = "sgd"                   # thesis, training settings: SGD
  c.optim.momentum = 0.9                 # ours: the thesis gives no momentum; the usual 0.9
  c.optim.lr = 1e-5                      # thesis, training settings: base LR 1e-5
  c.lr.scaling = "linear"                # thesis, LR policies: the linear scaling rule
  c.train.per_device_batch_size = 7      # thesis, training settings: 7 per GPU
  c.train.num_epochs = 100               # thesis, training settings: 100 epochs
  c.train.loss = "dice_ce"               # ours: the thesis names no loss; Dice + cross-entropy
                                         # copes with the small tumour share of each slice
  return c
