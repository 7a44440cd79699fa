"""Large-batch study: SGD with momentum on the synthetic brain set, long enough that 8
devices make over 300 optimizer steps; a run takes minutes on a 2-core CPU.

    python -m medseg_jax.tuning.study --config=configs/large_batch_study.py --devices=1,8 \\
        --policies=linear,linear_gradual,grescale --baseline_only_on_fewest --seeds=3 \\
        --workdir=DIR
"""

from configs import quickstart


def get_config():
  c = quickstart.get_config()  # 16 synthetic volumes, 32 slices each, 64x64, whole tumour
  c.model.base_features = 8      # ours: half the quickstart's width keeps a run in minutes
  c.optim.name = "sgd"           # the linear rule is derived for SGD (thesis: SGD)
  c.optim.momentum = 0.9         # ours: the usual value; the thesis does not give one
  c.optim.lr = 0.01              # eta for a batch of 4 slices, scaled by k on k devices
  c.train.per_device_batch_size = 4  # ours: 8 devices x 4 = 32 slices, 12 steps per epoch
  c.train.num_epochs = 30        # ours: 360 steps on 8 devices, 2,880 on one
  c.train.eval_every_steps = 270  # ten validations on one device, one on eight, then the end
  c.checkpoint.every_steps = 0   # the end of the run (and the best validation) only
  c.monitor.log_every_steps = 50
  return c
