"""Checks a whole config before any data work, so a mistake costs a second, not a
preprocessing pass (fail fast).

The checks reuse the builders that will consume each section (the model registry,
losses, optimizers, LR policies, augmentation, the parallel strategies, the
preprocessing settings) on the config itself, so the lists of valid values live in one
place. Nothing here reads the dataset or writes a file.
"""

import jax
import ml_collections
import numpy as np

from medseg_jax import config_schema, kinds, models, optim
from medseg_jax.training import losses, settings, warm_start
from medseg_jax.data import pipeline
from medseg_jax.errors import ConfigError
from medseg_jax.evaluation import postprocess
from medseg_jax.monitor import profiler
from medseg_jax.parallel import multihost, strategies

# Counts and periods the loop divides by or counts down: (key, lowest valid value).
_AT_LEAST = (
    ("train.num_epochs", 0), ("train.num_steps", 0), ("train.eval_every_steps", 0),
    ("train.eval_batch_size", 0), ("train.early_stopping_patience", 0),
    ("train.divergence_factor", 0), ("train.divergence_patience", 1),
    ("checkpoint.every_steps", 0), ("checkpoint.max_to_keep", 1),
    ("monitor.log_every_steps", 1), ("monitor.system_interval_seconds", 0),
    ("model.depth", 1), ("model.base_features", 1), ("model.fc_features", 1),
    ("model.max_features", 0), ("data.preprocess_workers", 0),
)
# The spatial dimensions of the built-in networks' inputs (a user's network is checked on
# an input of the configured shape instead).
_NETWORK_DIMS = {"unet": 2, "fcn": 2, "unet3d": 3}


def check(cfg: ml_collections.ConfigDict, starts_fresh: bool = True) -> None:
  """Raises ConfigError naming the first key of `cfg` that cannot be used (the device
  count is part of the check). The weights of `model.init_from` are looked for only when
  a run `starts_fresh` (a resume, an evaluation or a prediction reads the run's own
  checkpoint)."""
  for key, lowest in _AT_LEAST:
    value = config_schema.lookup(cfg, key)
    if value < lowest:
      raise ConfigError(f"{key}={value}: must be at least {lowest}")
  if not cfg.train.num_steps and not cfg.train.num_epochs:
    raise ConfigError("train.num_epochs=0 and train.num_steps=0: nothing to train")
  if not 0 <= cfg.model.dropout < 1:
    raise ConfigError(f"model.dropout={cfg.model.dropout}: must be in [0, 1)")
  run = settings.read(cfg)
  _check_network_dims(cfg.model.name, run.kind)
  par = strategies.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
  batch = pipeline.global_batch(cfg.train.per_device_batch_size, par.num_devices)
  run.kind.warn(run.source.samples_per_epoch, cfg.data.augment.enabled)
  profiler.check_steps(cfg.monitor.profile_steps)
  postprocess.from_config(cfg.evaluation)
  # Lengths are in epochs; any steps per epoch exercises every policy setting.
  steps_per_epoch = 10
  num_steps = cfg.train.num_steps or cfg.train.num_epochs * steps_per_epoch
  schedule = optim.resolve_schedule(cfg, batch, steps_per_epoch, num_steps).schedule
  tx = optim.make_optimizer(cfg, schedule)
  params = _abstract_params(cfg, run.kind, par)
  _check_same_sources(run.components)
  warm_start.check(cfg.model, params, starts_fresh, _num_classes(cfg))
  jax.eval_shape(tx.init, params)


def _check_network_dims(name: str, kind: kinds.DataKind) -> None:
  """A built-in network of as many spatial dimensions as the run's examples."""
  if _NETWORK_DIMS.get(name, kind.dims) != kind.dims:
    wanted = [n for n, d in _NETWORK_DIMS.items() if d == kind.dims]
    raise ConfigError(f"model.name={name!r}: a {_NETWORK_DIMS[name]}D network; "
                      f"data.spatial_dims={kind.dims} needs {' or '.join(wanted)} "
                      "(or your own)")


def _abstract_params(cfg: ml_collections.ConfigDict, kind: kinds.DataKind,
                     par: strategies.Parallel):
  """The model's parameter shapes, traced without computing (no real initialisation),
  once the network and the loss are checked against their contracts."""
  # The class count and channels come from the dataset; any values build the same layers.
  num_classes = _num_classes(cfg)
  channels = len(cfg.data.modalities) or 1
  model = models.build_model(cfg.model, num_classes, cfg.data.image_size, par.bn_axis_name)
  losses.check_loss(cfg.train.loss, num_classes, kind.dims)
  spatial = kind.input_shape(channels)[:-1]
  return models.abstract_variables(cfg.model, model, num_classes, spatial, channels)["params"]


def _check_same_sources(records: dict) -> None:
  """Every process resolved the same component files: a run whose processes train
  different code would not fail, it would silently average different networks."""
  digests = np.frombuffer(b"".join(bytes.fromhex(r["sha256"] or "0" * 64)
                                   for r in records.values()), np.uint8)
  every = multihost.all_processes(digests)
  for index, (key, record) in enumerate(records.items()):
    rows = {bytes(row[32 * index:32 * (index + 1)]) for row in every}
    if len(rows) > 1:
      raise ConfigError(f"{key}={record['spec']!r}: the processes read different versions of "
                        f"{record['source']} (its SHA-256 differs between processes)")


def _num_classes(cfg: ml_collections.ConfigDict) -> int:
  """The network's outputs as far as the config tells them: one per region, or per class
  of `data.label_map` (2 when the dataset decides)."""
  if cfg.data.regions:
    return len(cfg.data.regions)
  return max(cfg.data.label_map) + 1 if cfg.data.label_map else 2

