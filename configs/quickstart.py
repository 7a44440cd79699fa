"""A small U-Net on a synthetic Decathlon-format dataset written to WORKDIR/data; minutes on a CPU."""

from medseg_jax import defaults


def get_config():
  c = defaults.get_config()
  c.model.name = "unet"
  c.model.depth = 3
  c.model.base_features = 16
  c.data.synthetic = True
  c.data.synthetic_volumes = 16
  c.data.synthetic_shape = (96, 96, 48)
  c.data.slices_per_volume = 32
  c.data.label_map = (0, 1, 1)           # whole tumour (oedema + core) vs background
  c.data.image_size = 64
  c.optim.name = "adam"
  c.optim.lr = 2e-3
  c.train.per_device_batch_size = 16
  c.train.num_epochs = 16
  c.train.eval_every_steps = 100
  c.checkpoint.every_steps = 100
  c.monitor.log_every_steps = 20
  return c
