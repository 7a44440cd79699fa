"""The door: a run's ConfigDict read once into the settings the stages below take.

The data settings both kinds share become a `data.source.Source`; what differs between
slices and volumes becomes the run's kind of data (`medseg_jax.kinds`); the components
the config names are resolved and recorded. The stages take those, or plain values.
"""

import dataclasses

import ml_collections

from medseg_jax import components, kinds, models
from medseg_jax.data import augment, split, targets
from medseg_jax.data.source import Source
from medseg_jax.errors import ConfigError
from medseg_jax.parallel import strategies
from medseg_jax.training import losses, plugins


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """A run's settings: the config as given (recorded with the run), its data source and
  its kind of data, each read and checked once."""

  cfg: ml_collections.ConfigDict
  source: Source
  kind: kinds.DataKind
  network: components.Component         # model.name, resolved
  loss: components.Component            # train.loss, resolved
  plugins: tuple[components.Component, ...]  # train.plugins, resolved
  components: dict   # config key -> spec, source file and SHA-256 of each component


def read(cfg: ml_collections.ConfigDict) -> RunSettings:
  """The settings of `cfg`; a bad data value is a ConfigError naming its key, a
  component that cannot be resolved one naming its."""
  network, loss = models.network(cfg.model), losses.loss_component(cfg.train.loss)
  found = tuple(plugins.plugin_components(cfg))
  return RunSettings(cfg=cfg, source=source(cfg), kind=kinds.from_config(cfg),
                     network=network, loss=loss, plugins=found,
                     components=_records(cfg, network, loss, found))


def _records(cfg: ml_collections.ConfigDict, network: components.Component,
             loss: components.Component, found) -> dict:
  """The spec, source file and SHA-256 of every component `cfg` names, by config key."""
  records = {c.key: c.record() for c in
             (network, loss, strategies.strategy_component(cfg.parallel.strategy))}
  for index, plugin in enumerate(found):
    records[f"train.plugins[{index}]"] = plugin.record()
  return records


def source(cfg: ml_collections.ConfigDict) -> Source:
  """The shared `data.*` settings of `cfg`, checked."""
  data = cfg.data
  if data.split_seed is not None and data.split_seed < 0:
    raise ConfigError(f"data.split_seed={data.split_seed}: must be at least 0 "
                      "(or unset: the split follows `seed`)")
  split.check_fractions(data.val_fraction, data.test_fraction)
  split.check_fold(data.fold, data.num_folds)
  targets.check(tuple(data.regions), tuple(data.regions_class_order))
  if data.synthetic:
    if data.synthetic_volumes < 3:
      raise ConfigError(f"data.synthetic_volumes={data.synthetic_volumes}: need at least 3 "
                        "(train, validation and test)")
    shape = tuple(data.synthetic_shape)
    if len(shape) != 3 or min(shape) < 1:
      raise ConfigError(f"data.synthetic_shape={shape}: need three positive sizes")
  return Source(root=data.root, synthetic=bool(data.synthetic),
                synthetic_volumes=data.synthetic_volumes,
                synthetic_shape=tuple(data.synthetic_shape), cache_dir=data.cache_dir,
                skip_invalid=bool(data.skip_invalid),
                preprocess_workers=data.preprocess_workers,
                modalities=tuple(data.modalities), label_map=tuple(data.label_map),
                regions=tuple(tuple(r) for r in data.regions),
                regions_class_order=tuple(data.regions_class_order),
                val_fraction=data.val_fraction, test_fraction=data.test_fraction,
                split_seed=split.split_seed(cfg), fold=data.fold, num_folds=data.num_folds,
                samples_per_epoch=augment.samples_per_epoch(data.augment))
