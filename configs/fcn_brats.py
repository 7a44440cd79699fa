"""FCN-8s on Decathlon Task01_BrainTumour, the thesis's brain-tumour setting.

Each value that differs from base.py or that the thesis states says where it comes from:
"thesis" (with the part of the thesis) or "ours" (with the reason, where the thesis
leaves the choice open). `model.init_from` is the ImageNet VGG-16 the user downloads
(README, "Starting from pretrained weights"); `--config.model.init_from=""` trains from
scratch.
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.name = "fcn"                   # thesis, models: FCN-8s (Long et al. 2015)
  c.model.base_features = 64             # thesis, models: VGG-16 widths (64 ... 512) ...
  c.model.fc_features = 4096             # thesis, models: ... and fc6/fc7 as 4096-wide convs
  c.model.dropout = 0.5                  # thesis, models: dropout; ours: Long et al.'s 0.5
                                         # (the thesis gives no rate)
  # thesis, models: initialised from MatConvNet's ImageNet VGG-16 (transfer learning)
  c.model.init_from = "pretrained/imagenet-vgg-verydeep-16.mat"
  c.data.root = "data/Task01_BrainTumour"  # ours: where the Decathlon download is extracted
  c.data.modalities = ("T1w",)           # thesis, use cases: the T1-weighted modality only
  c.data.label_map = (0, 1, 1, 1)        # ours: the thesis does not group the tumour labels;
                                         # every tumour label vs background
  c.data.slice_selection = "central"     # ours: the thesis does not say which 70 slices
  c.data.slices_per_volume = 70          # thesis, use cases: 70 2D slices per volume
  c.data.image_size = 224                # ours: the thesis gives no brain slice size; FCN-8s
                                         # needs a multiple of 32, and 224 is VGG's own
  c.data.augment.enabled = False         # thesis, use cases: no augmentation for the brain
  c.optim.name = "sgd"                   # thesis, training settings: SGD
  c.optim.momentum = 0.9                 # ours: the thesis gives no momentum; the usual 0.9
  c.optim.lr = 1e-5                      # thesis, training settings: base LR 1e-5
  c.lr.scaling = "linear"                # thesis, LR policies: the linear scaling rule
  c.train.per_device_batch_size = 10     # thesis, training settings: 10 per GPU
  c.train.num_epochs = 120               # thesis, training settings: 120 epochs
  c.train.loss = "dice_ce"               # ours: the thesis names no loss; Dice + cross-entropy
                                         # copes with the small tumour share of each slice
  return c
