"""FCN-8s on Decathlon Task01_BrainTumour, thesis settings (T1w, 70 slices, tumour vs background)."""

from configs import base


def get_config():
  c = base.get_config()
  c.model.name = "fcn"
  c.model.dropout = 0.5
  c.data.root = "data/Task01_BrainTumour"
  c.data.modalities = ("T1w",)
  c.data.label_map = (0, 1, 1, 1)
  c.data.slices_per_volume = 70
  c.data.image_size = 224                # FCN-8s needs a multiple of 32
  c.optim.name = "sgd"
  c.optim.lr = 1e-5
  c.train.per_device_batch_size = 10
  c.train.num_epochs = 120
  return c
