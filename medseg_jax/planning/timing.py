"""The time of a plan's train step on the devices at hand: the step training compiles (the
strategy's, with its all-reduce), on random data, after a first call that compiles it."""

import functools
import time

import jax
import ml_collections
import numpy as np

from medseg_jax import kinds, models, optim
from medseg_jax.parallel import strategies
from medseg_jax.training import losses, step
from medseg_jax.training.state import init_state

TIMED_STEPS = 2  # after the first call (compile and warm-up), the mean of these


def step_seconds(cfg: ml_collections.ConfigDict, num_classes: int, channels: int,
                 num_devices: int) -> tuple[float, float]:
  """Seconds per train step of `cfg` on `num_devices` of this process's devices (each with
  `train.per_device_batch_size` examples) and seconds of its first call."""
  par = strategies.make_parallel(cfg.parallel.strategy, num_devices)
  kind = kinds.from_config(cfg)
  shape = kind.input_shape(channels)
  model = models.build_model(cfg.model, num_classes, cfg.data.image_size, par.bn_axis_name)
  rng = np.random.default_rng(0)
  state = par.put_state(_random_state(model, optim.make_optimizer(cfg, float(cfg.optim.lr)),
                                      shape, rng))
  train = par.train_step(functools.partial(step.train_step,
                                           loss_fn=losses.get_loss(cfg.train.loss),
                                           augment=kind.augmentation()))
  rows = cfg.train.per_device_batch_size * num_devices
  batch = par.put_batch({"image": rng.normal(size=(rows,) + shape).astype(np.float32),
                         "label": rng.integers(0, num_classes, (rows,) + shape[:-1],
                                               dtype=np.int32)})
  times = []
  for i in range(TIMED_STEPS + 1):
    start = time.perf_counter()
    state, metrics = train(state, batch, jax.random.key(i))
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  return float(np.median(times[1:])), times[0]


def _random_state(model, tx, shape: tuple, rng: np.random.Generator):
  """A train state of `model` filled with small positive random numbers (positive: no
  square root of a negative second moment or variance, whose NaNs could time otherwise): a
  step takes as long with them as with initialised ones, and shaping it (jax.eval_shape)
  compiles nothing, where initialising would compile the model's init (seconds per
  candidate on a CPU)."""
  abstract = jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0), shape))
  def fill(leaf):
    if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating):
      return rng.uniform(0.0, 0.05, leaf.shape).astype(leaf.dtype)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      return jax.random.key(0)
    return np.zeros(leaf.shape, leaf.dtype)
  return jax.tree.map(fill, abstract)
