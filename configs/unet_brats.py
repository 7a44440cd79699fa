"""U-Net on Decathlon Task01_BrainTumour, thesis settings (T1w, 70 slices, tumour vs background)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.name = "unet"
  c.data.root = "data/Task01_BrainTumour"
  c.data.modalities = ("T1w",)
  c.data.label_map = (0, 1, 1, 1)        # every tumour label vs background
  c.data.slices_per_volume = 70
  c.data.image_size = 240
  c.optim.name = "sgd"
  c.optim.lr = 1e-5
  c.train.per_device_batch_size = 7
  c.train.num_epochs = 100
  return c
