"""U-Net on Decathlon Task02_Heart (left atrium), thesis settings (70 slices, 512x512, augmented)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.name = "unet"
  c.data.root = "data/Task02_Heart"
  c.data.modalities = ("MRI",)
  c.data.slices_per_volume = 70
  c.data.image_size = 512
  # The thesis augmented the left-atrium slices: rotation in [-45, 45] degrees, zoom in
  # [0.8, 1.2], translation up to 25.6 px (base.py's ranges); here on the fly, per step.
  c.data.augment.enabled = True
  c.optim.name = "sgd"
  c.optim.lr = 2e-5
  c.train.per_device_batch_size = 7
  c.train.num_epochs = 100
  return c
