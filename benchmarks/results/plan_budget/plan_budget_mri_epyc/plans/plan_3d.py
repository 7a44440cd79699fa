"""The 3D plan of SyntheticBrain for 1 device(s), made by `python -m medseg_jax.plan`;
train it with `python -m medseg_jax.main --config=/work/runs/pb3/plans/plan_3d.py --workdir=runs/SyntheticBrain_3d`."""

from medseg_jax import defaults

FINGERPRINT_SHA256 = '36348ec786fdafd8cd44f29beb2ccc858f2e07b84a566169eb2452e05de8b2a8'
NUM_DEVICES = 1
MEMORY_BUDGET = '50% of the free RAM (23.0 GiB) over 1 CPU device(s)'
TIME_BUDGET_SECONDS = 600.0


def get_config():
  c = defaults.get_config()
  # the dataset planned
  c.data.root = '/work/runs/pb3/data'
  # the 3D plan
  c.data.spatial_dims = 3
  # no channel is CT: z-score each volume over its non-zero voxels (a case's non-zero box
  # holds a median 54% of its voxels, under 75%)
  c.data.volume_normalisation = 'mri'
  # nnU-Net crops every case to its non-zero box (here a median 54% of its voxels)
  c.data.crop_to_nonzero = True
  # the median spacing of the 24 training cases
  c.data.target_spacing = (1.0, 1.0, 2.0)
  # nnU-Net's foreground oversampling
  c.data.foreground_fraction = 0.3333333333333333
  # a time budget's run is short: off (on the synthetic MRI set a 10-minute 3D plan's
  # validation Dice was 0.01-0.10 higher without it at every validation of 2 seeds,
  # BENCHMARKS.md); nnU-Net's ranges below are for 1000 epochs
  c.data.augment.enabled = False
  # nnU-Net's +-30 degrees
  c.data.augment.rotation_degrees = 30.0
  # nnU-Net's scaling range
  c.data.augment.zoom = (0.7, 1.4)
  # unused in 3D: patches are drawn at random places
  c.data.augment.translate_pixels = 0.0
  # nnU-Net mirrors along every axis
  c.data.augment.flip_probability = 0.5
  # nnU-Net's brightness in [0.75, 1.25]
  c.data.augment.intensity_scale = 0.25
  # the 3D U-Net
  c.model.name = 'unet3d'
  # from the median shape at the target spacing, shrunk (largest axis relative to the median
  # shape first) until a batch of 2 fits the memory budget
  c.data.patch_size = (32, 40, 20)
  # levels pooled until an axis would fall under 4 voxels (at most 5)
  c.model.depth = 3
  # an axis is pooled while its spacing is under twice the finest axis's (so a coarse axis
  # waits)
  c.model.pooling = ((2, 2, 1), (2, 2, 2), (2, 2, 2))
  # time budget 600 s: the largest network (width x voxels) that trains at least 1000 steps
  # in 80% of it (else the fastest); timed here: width 8 at 32x40x20: 0.54 s/step, 889
  # steps; width 8 at 48x48x24: 1.17 s/step, 410 steps
  c.model.base_features = 8
  # nnU-Net's cap on a 3D level's width
  c.model.max_features = 320
  # per-example statistics, as nnU-Net's
  c.model.norm = 'instance'
  # nnU-Net's optimizer: SGD, Nesterov momentum 0.99
  c.optim.name = 'sgd'
  # nnU-Net's
  c.optim.momentum = 0.99
  # nnU-Net's
  c.optim.nesterov = True
  # nnU-Net's initial LR, for one device's batch
  c.optim.lr = 0.01
  # nnU-Net's
  c.optim.weight_decay = 3e-05
  # nnU-Net clips the gradient norm at 12
  c.optim.grad_clip_norm = 12.0
  # the LR above is one device's
  c.lr.reference_batch_size = 2
  # XLA plans 2.74 GiB for a train step of batch 2 (width 32, the largest example), within
  # 11.49 GiB (50% of the free RAM (23.0 GiB) over 1 CPU device(s)); 5% of the dataset's
  # voxels per global batch caps it (at least 2 over all devices)
  c.train.per_device_batch_size = 2
  # an epoch: a 50th of the steps the time budget holds
  c.data.augment.samples_per_epoch = 36
  # the epochs warm-up and decay count
  c.train.num_epochs = 50
  # the steps the time budget holds
  c.train.num_steps = 889
  # 5 validations per run
  c.train.eval_every_steps = 178
  # with every validation
  c.checkpoint.every_steps = 178
  # one device: nnU-Net's schedule
  c.lr.policy = 'standard'
  # one device: nothing to scale
  c.lr.scaling = 'none'
  # (1 - t/T)^0.9, nnU-Net's
  c.lr.decay = 'poly'
  return c
