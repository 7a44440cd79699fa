"""The 2D plan of SyntheticBrain for 1 device(s), made by `python -m medseg_jax.plan`;
train it with `python -m medseg_jax.main --config=/work/runs/pbct/plans/plan_2d.py --workdir=runs/SyntheticBrain_2d`."""

from medseg_jax import defaults

FINGERPRINT_SHA256 = '5bc7c4e9b9d63bec8ea5f4ccb5b12a1e80ed52051ca83f20fa1edbd6f765bd40'
NUM_DEVICES = 1
MEMORY_BUDGET = '50% of the free RAM (21.9 GiB) over 1 CPU device(s)'
TIME_BUDGET_SECONDS = 600.0


def get_config():
  c = defaults.get_config()
  # the dataset planned
  c.data.root = '/work/runs/pbct/data'
  # the 2D plan
  c.data.spatial_dims = 2
  # CT: clipped to each volume's 0.5-99.5 percentiles, rescaled to [0, 1]
  c.data.normalisation = 'percentile'
  # slices across the coarsest axis (the last when all are equal), so each slice keeps the
  # finest spacing
  c.data.slice_axis = 2
  # every slice of every training volume
  c.data.slice_selection = 'all'
  # every slice
  c.data.slices_per_volume = 0
  # the 2D U-Net
  c.model.name = 'unet'
  # the larger median in-plane size at the median spacing, a multiple of 2**depth
  c.data.image_size = 96
  # levels pooled until a side would fall under 4 pixels (at most 5)
  c.model.depth = 4
  # time budget 600 s: the largest network (width x voxels) that trains at least 1000 steps
  # in 80% of it (when none does, the smallest width on an example shrunk in proportion to
  # the steps missing); timed here: width 8 at 96x96: 0.39 s/step, 1230 steps; width 32 at
  # 64x64: 1.56 s/step, 307 steps; width 16 at 96x96: 1.02 s/step, 471 steps
  c.model.base_features = 8
  # per-example statistics, independent of the batch
  c.model.norm = 'group'
  # a time budget's run is short: off (on the synthetic MRI set a 10-minute 3D plan's
  # validation Dice was 0.01-0.10 higher without it at every validation of 2 seeds,
  # BENCHMARKS.md); nnU-Net's ranges below are for 1000 epochs
  c.data.augment.enabled = False
  # nnU-Net's +-30 degrees
  c.data.augment.rotation_degrees = 30.0
  # nnU-Net's scaling range
  c.data.augment.zoom = (0.7, 1.4)
  # a tenth of the slice's side
  c.data.augment.translate_pixels = 9.6
  # nnU-Net mirrors along every axis
  c.data.augment.flip_probability = 0.5
  # nnU-Net's brightness in [0.75, 1.25]
  c.data.augment.intensity_scale = 0.25
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
  c.lr.reference_batch_size = 20
  # XLA plans 0.69 GiB for a train step of batch 20 (width 32, the largest example), within
  # 10.96 GiB (50% of the free RAM (21.9 GiB) over 1 CPU device(s)); 5% of the dataset's
  # voxels per global batch caps it (at least 2 over all devices)
  c.train.per_device_batch_size = 20
  # an epoch: a 50th of the steps the time budget holds
  c.data.augment.samples_per_epoch = 492
  # the epochs warm-up and decay count
  c.train.num_epochs = 50
  # the steps the time budget holds
  c.train.num_steps = 1230
  # 5 validations per run
  c.train.eval_every_steps = 246
  # with every validation
  c.checkpoint.every_steps = 246
  # one device: nnU-Net's schedule
  c.lr.policy = 'standard'
  # one device: nothing to scale
  c.lr.scaling = 'none'
  # (1 - t/T)^0.9, nnU-Net's
  c.lr.decay = 'poly'
  return c
