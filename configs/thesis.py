"""The thesis's settings, shared by its four configs (U-Net and FCN on the brain tumour and
the left atrium).

Each value says where it comes from: "thesis" (with the part of the thesis) or "ours"
(with the reason, where the thesis leaves the choice open). Not a config itself.
"""

import ml_collections

VGG16_MAT = "pretrained/imagenet-vgg-verydeep-16.mat"


def unet(c: ml_collections.ConfigDict) -> None:
  c.model.name = "unet"                  # thesis, models: U-Net (Ronneberger 2015)
  c.model.base_features = 64             # thesis, models: channels doubling from 64 ...
  c.model.depth = 4                      # thesis, models: ... over four poolings


def fcn(c: ml_collections.ConfigDict) -> None:
  c.model.name = "fcn"                   # thesis, models: FCN-8s (Long et al. 2015)
  c.model.base_features = 64             # thesis, models: VGG-16 widths (64 ... 512) ...
  c.model.fc_features = 4096             # thesis, models: ... and fc6/fc7 as 4096-wide convs
  c.model.dropout = 0.5                  # thesis, models: dropout; ours: Long et al.'s 0.5
                                         # (the thesis gives no rate)
  # thesis, models: initialised from MatConvNet's ImageNet VGG-16 (transfer learning); the
  # user downloads it (docs/components.md), `--config.model.init_from=""` trains from scratch
  c.model.init_from = VGG16_MAT


def brain_tumour(c: ml_collections.ConfigDict) -> None:
  """Decathlon Task01_BrainTumour; the slice size is the model's (set by each config)."""
  c.data.root = "data/Task01_BrainTumour"  # ours: where the Decathlon download is extracted
  c.data.modalities = ("T1w",)           # thesis, use cases: the T1-weighted modality only
  c.data.label_map = (0, 1, 1, 1)        # ours: the thesis does not group the tumour labels;
                                         # every tumour label vs background
  c.data.slice_selection = "central"     # ours: the thesis does not say which 70 slices
  c.data.slices_per_volume = 70          # thesis, use cases: 70 2D slices per volume
  c.data.augment.enabled = False         # thesis, use cases: no augmentation for the brain


def left_atrium(c: ml_collections.ConfigDict) -> None:
  """Decathlon Task02_Heart, the thesis's left-atrium data."""
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


def training(c: ml_collections.ConfigDict, per_device_batch: int, epochs: int,
             lr: float) -> None:
  """SGD with a row of the thesis's training-settings table (batch per GPU, epochs, base LR)."""
  c.optim.name = "sgd"                   # thesis, training settings: SGD
  c.optim.momentum = 0.9                 # ours: the thesis gives no momentum; the usual 0.9
  c.optim.lr = lr                        # thesis, training settings: the base LR
  c.lr.scaling = "linear"                # thesis, LR policies: the linear scaling rule
  c.train.per_device_batch_size = per_device_batch  # thesis, training settings: per GPU
  c.train.num_epochs = epochs            # thesis, training settings
  c.train.loss = "dice_ce"               # ours: the thesis names no loss; Dice + cross-entropy
                                         # copes with the small share of foreground per slice


def unet3d(c: ml_collections.ConfigDict, patch: tuple) -> None:
  """A 3D U-Net on patches, for the thesis's tasks in 3D: the thesis trains 2D networks only,
  so every value here is ours, after nnU-Net's 3d_fullres (Isensee et al. 2021)."""
  c.data.spatial_dims = 3                # ours: whole volumes and patches
  c.model.name = "unet3d"                # ours: 3D U-Net (Cicek et al. 2016)
  c.model.base_features = 32             # ours: nnU-Net's 32 channels at the first level ...
  c.model.depth = 4                      # ours: ... over four poolings
  c.model.norm = "instance"              # ours: nnU-Net's instance norm (batch 2 per device)
  c.data.target_spacing = ()             # ours: the dataset's median spacing, as nnU-Net
  c.data.patch_size = patch              # ours: nnU-Net's patch for the task (config file)
  c.data.foreground_fraction = 1 / 3     # ours: nnU-Net's share of foreground patches
  c.data.augment.samples_per_epoch = 500  # ours: nnU-Net's epoch of 250 batches of 2
  c.evaluation.mirror = True             # ours: nnU-Net's test-time mirroring
  c.optim.name = "sgd"                   # ours: nnU-Net's SGD ...
  c.optim.lr = 1e-2                      # ours: ... from 0.01 at a batch of 2 ...
  c.optim.momentum = 0.99                # ours: ... with momentum 0.99 ...
  c.optim.nesterov = True                # ours: ... Nesterov's ...
  c.optim.weight_decay = 3e-5            # ours: ... and weight decay 3e-5
  c.lr.scaling = "linear"                # thesis, LR policies: the linear scaling rule
  c.lr.decay = "poly"                    # ours: nnU-Net's poly decay, power 0.9
  c.train.per_device_batch_size = 2      # ours: nnU-Net's batch of 2 patches
  c.train.num_epochs = 1000              # ours: nnU-Net's 1000 epochs
  c.train.loss = "dice_ce"               # ours: nnU-Net's Dice + cross-entropy
  c.train.eval_every_steps = 2000        # ours: sliding windows over every validation
                                         # volume are costly; about every 16 epochs on 8 GPUs
  c.checkpoint.every_steps = 2000        # ours: with each validation


def augment3d(c: ml_collections.ConfigDict) -> None:
  """On-device 3D augmentation per patch (the thesis augments the left atrium in 2D)."""
  c.data.augment.enabled = True          # ours: nnU-Net augments both tasks
  c.data.augment.rotation_degrees = 30.0  # ours: nnU-Net's +-30 degrees about each axis
  c.data.augment.zoom = (0.7, 1.4)       # ours: nnU-Net's scaling range
  c.data.augment.flip_probability = 0.5  # ours: nnU-Net mirrors along every axis
  c.data.augment.intensity_scale = 0.25  # ours: nnU-Net's brightness in [0.75, 1.25]
