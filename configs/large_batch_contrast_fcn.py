"""The large-batch contrast with the thesis's second network: FCN-8s (its VGG-16 encoder,
fc6/fc7 as convolutions, the pool3/pool4 skips) in place of the U-Net, on the same data,
split, optimizer, batch and schedule as configs/large_batch_contrast.py, from scratch.

    python -m medseg_jax.tuning.guideline --config=configs/large_batch_contrast_fcn.py \\
        --num_devices=8 --threshold=8 --workdir=DIR/guideline
    python -m medseg_jax.tuning.study --config=configs/large_batch_contrast_fcn.py \\
        --devices=1,8 --policies=linear,guideline --guideline=DIR/guideline \\
        --baseline_only_on_fewest --seeds=5 --workdir=DIR/study

The base LR is the pilot's (benchmarks/results/large_batch/pilot_fcn.md): a value at
which the one-device run trains and linear scaling to 8 devices loses Dice without
diverging, as the U-Net's was chosen.
"""

from configs import large_batch_contrast


def get_config():
  c = large_batch_contrast.get_config()
  c.model.name = "fcn"
  c.model.base_features = 8    # VGG-16's widths / 8 (8 ... 64), as the U-Net's 8: a
                               # one-device run in minutes on a CPU
  c.model.fc_features = 128    # fc6/fc7 as 4096 / 32: wider than the encoder's 64, as in
                               # FCN-8s, without fc6's 7x7 kernel dominating the step
  c.model.dropout = 0.5        # after fc6 and fc7, as Long et al. (configs/thesis.py)
  c.model.init_from = ""       # from scratch: ImageNet's VGG-16 has VGG's widths, not these
                               # (configs/fcn_brats.py starts from it)
  c.optim.lr = 0.0075          # eta for a batch of 2 slices, half the U-Net's. Pilot (seed 0):
                               # linear scaling to 8 x 0.0075 lost 0.023 Dice and did not
                               # diverge; at 8 x 0.015 and 8 x 0.06 it diverged
  return c
