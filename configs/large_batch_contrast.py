"""Large-batch study with a contrast: SGD with momentum on 40 synthetic brain volumes, a
split with 8 validation and 8 test volumes held fixed across seeds, and a base LR at
which linear scaling without warmup to 8 devices loses Dice without diverging (the pilot
in benchmarks/results/large_batch/pilot.md).

    python -m medseg_jax.tuning.guideline --config=configs/large_batch_contrast.py \\
        --num_devices=8 --threshold=8 --workdir=DIR/guideline
    python -m medseg_jax.tuning.study --config=configs/large_batch_contrast.py \\
        --devices=1,8 --policies=linear,linear_gradual,grescale,guideline \\
        --guideline=DIR/guideline --baseline_only_on_fewest --seeds=5 --workdir=DIR/study

The study's results: benchmarks/results/large_batch/ and BENCHMARKS.md.
"""

from configs import quickstart


def get_config():
  c = quickstart.get_config()  # synthetic brain phantoms, whole tumour, U-Net depth 3
  c.data.synthetic_volumes = 40  # 20% + 20% of 40: 8 validation and 8 test volumes, 24 train
  c.data.val_fraction = 0.2
  c.data.test_fraction = 0.2
  c.data.synthetic_shape = (64, 64, 32)  # smaller phantoms than the quickstart's: writing
                                 # 40 of them takes seconds; slices stay 64x64 (no resizing)
  c.data.slices_per_volume = 16  # the 16 central slices: 24 x 16 = 384 training slices,
                                 # as many as configs/large_batch_study.py trains on
  c.data.split_seed = 0          # one split (and data) for every seed and policy: runs with
                                 # the same seed are paired
  c.model.base_features = 8      # half the quickstart's width keeps a one-device run in minutes
  c.optim.name = "sgd"           # the linear rule is derived for SGD (thesis: SGD)
  c.optim.momentum = 0.9         # the usual value; the thesis does not give one
  c.optim.lr = 0.015             # eta for a batch of 2 slices, k x eta on k devices. Pilot:
                                 # at 8 x 0.015 = 0.12 linear scaling without warmup lost
                                 # 0.010 and 0.019 Dice (seeds 0, 1) and did not diverge;
                                 # at 0.16 one of two seeds collapsed to background
  c.train.per_device_batch_size = 2  # 8 devices x 2 = 16 slices: 24 steps per epoch
  c.train.num_epochs = 30        # 720 steps on 8 devices, 5,760 on one
  c.lr.decay = "cosine"          # to 0 at the end, where the run is tested: with a constant
                                 # LR the baseline's test Dice moved by 0.06 between seeds
                                 # (pilot), with cosine by 0.001-0.005 (GreScale: its own
                                 # decay)
  c.train.eval_every_steps = 0   # validation at the end only: every device count is tested
                                 # on its last state, none picks its best of more validations
  c.checkpoint.every_steps = 0   # the end of the run only
  c.monitor.log_every_steps = 50
  return c
