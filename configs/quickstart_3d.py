"""A small 3D U-Net trained on patches of a synthetic Decathlon-format dataset written to
WORKDIR/data, validated by sliding windows over whole volumes; minutes on a CPU."""

from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  c.model.name = "unet3d"
  c.model.depth = 3
  c.model.base_features = 8
  c.model.norm = "instance"
  c.data.spatial_dims = 3
  c.data.synthetic = True
  c.data.synthetic_volumes = 16
  c.data.synthetic_shape = (64, 64, 32)  # 1 x 1 x 2 mm voxels: the median spacing
  c.data.label_map = (0, 1, 1)           # whole tumour (oedema + core) vs background
  c.data.patch_size = (32, 32, 32)
  c.data.augment.samples_per_epoch = 50  # patches per epoch
  c.optim.name = "adam"
  c.optim.lr = 2e-3
  c.lr.decay = "poly"                    # (1 - t/T)^0.9, as nnU-Net
  c.train.per_device_batch_size = 2
  c.train.num_epochs = 12
  c.train.eval_every_steps = 100
  c.checkpoint.every_steps = 100
  c.monitor.log_every_steps = 20
  return c
