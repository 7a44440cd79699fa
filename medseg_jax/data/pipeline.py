"""The data path, run in order: read dataset.json, validate it, preprocess and write the
slice store (3D: the volume store), split by subject, load. Each stage is one module that
imports only the modules listed above it here, and none imports this one:

  decathlon   dataset.json and the one NIfTI reader (reorientation to RAS)
  preprocess  the data settings, the one label mapper, volumes to slices (numpy only)
  pool        the process-pool helper
  validate    every problem of a dataset at once; reads a subject and checks it
  store       the tensorstore slice store: per subject, validate.read_case then preprocess
  split       subjects into train, validation and test
  loader      a split's slices, and each process's part of its batches
  (3D, data.spatial_dims=3: resample, volume_store, patches and volume_loader in their
  place: whole volumes at one voxel spacing, and patches drawn from them)

Process 0 builds the slice store once per dataset and settings; every process opens it
and reads only the rows it feeds. The functions that write for every process take the
`barrier` they wait at (`parallel.multihost.barrier`: the data stage sits below the
parallel one and is handed it).
"""

import dataclasses
import functools
import os
from typing import Callable, Iterator

import jax
import ml_collections
from absl import logging

from medseg_jax.data import (augment, augment3d, decathlon, loader, preprocess, split, store,
                             synthetic, validate, volume_loader, volume_store)
from medseg_jax.errors import ConfigError, DataError

Barrier = Callable[[str], None]  # waits until every process reaches the named point
SPATIAL_DIMS = (2, 3)


def dataset_root(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[str, bool]:
  """The dataset directory, and whether the synthetic dataset is to be written there.

  Reads no data and writes nothing. Synthetic data (`data.synthetic=True`) goes only
  where the run owns the place, WORKDIR/data when `data.root` is empty, or into a
  `data.root` that is an existing empty directory (the user made it for this). Any
  other `data.root` must hold a dataset, so a misspelt path is "not found", never a
  fresh synthetic dataset.
  """
  if not cfg.data.root:
    if not cfg.data.synthetic:
      raise ConfigError("data.root: no dataset directory given (or set data.synthetic=True)")
    root = os.path.join(workdir, "data")
    return root, not os.path.exists(os.path.join(root, "dataset.json"))
  root = cfg.data.root
  if os.path.exists(os.path.join(root, "dataset.json")):
    return root, False
  if cfg.data.synthetic and os.path.isdir(root) and not os.listdir(root):
    return root, True
  hint = (" (data.synthetic=True writes a synthetic dataset only into WORKDIR/data, with "
          "data.root empty, or into an existing empty data.root)" if cfg.data.synthetic else "")
  raise DataError(f"{os.path.join(root, 'dataset.json')}: not found (data.root must be a "
                  f"Decathlon task directory){hint}")


def check_dataset_root(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises the error `dataset_root` would raise (the directory is missing, holds no
  dataset, or is not the run's to write into), reading no data: a check before data work."""
  dataset_root(cfg, workdir)


def prepare_dataset_root(cfg: ml_collections.ConfigDict, workdir: str,
                         barrier: Barrier) -> str:
  """The dataset directory; writes the synthetic dataset there first if configured."""
  root, write = dataset_root(cfg, workdir)
  if write and jax.process_index() == 0:  # the others wait for it at the barrier below
    _write_synthetic(cfg, root)
  if cfg.data.synthetic:
    barrier("synthetic dataset")
  return root


def _write_synthetic(cfg: ml_collections.ConfigDict, root: str) -> None:
  if os.path.exists(root) and os.listdir(root):
    raise DataError(f"{root}: exists without dataset.json; will not write synthetic data there")
  logging.info("Writing a synthetic Decathlon dataset to %s", root)
  # An empty `root` stays in place until the complete dataset replaces it, so another
  # process never sees it missing.
  synthetic.write_synthetic_decathlon(root, cfg.data.synthetic_volumes, num_test=2,
                                      shape=tuple(cfg.data.synthetic_shape),
                                      seed=split.split_seed(cfg))


def check_spatial_dims(data_cfg: ml_collections.ConfigDict) -> int:
  """`data.spatial_dims`, and with 3 the volume settings; a bad value is a ConfigError."""
  dims = data_cfg.spatial_dims
  if dims not in SPATIAL_DIMS or isinstance(dims, bool):
    raise ConfigError(f"data.spatial_dims={dims!r}: must be 2 (slices) or 3 (volumes)")
  if dims == 3:
    volume_settings(data_cfg)
  return dims


def augmentation(data_cfg: ml_collections.ConfigDict) -> Callable | None:
  """The train step's on-device augmentation that `data.augment` asks for (None when
  off), checked: of slices, or with `data.spatial_dims=3` of patches (`augment3d`,
  `rotation_degrees` about each of the three axes; `translate_pixels` is not used, a
  patch's position being drawn already)."""
  section = data_cfg.augment
  if data_cfg.spatial_dims != 3:
    return augment.from_config(section)
  if not section.enabled:
    return None
  ranges = augment3d.Ranges(rotation_degrees=(float(section.rotation_degrees),) * 3,
                            zoom=tuple(float(z) for z in section.zoom),
                            flip_probability=float(section.flip_probability),
                            intensity_scale=float(section.intensity_scale),
                            intensity_shift=float(section.intensity_shift))
  augment3d.check(ranges)
  return functools.partial(augment3d.augment_batch, ranges=ranges)


def volume_settings(data_cfg: ml_collections.ConfigDict) -> volume_store.Settings:
  """The volume store's settings of a `data` config section (3D); checked."""
  return volume_store.check_settings(volume_store.Settings(
      modalities=tuple(data_cfg.modalities), label_map=tuple(data_cfg.label_map),
      target_spacing=_numbers("data.target_spacing", data_cfg.target_spacing),
      normalisation=data_cfg.volume_normalisation,
      ct_clip_percentiles=_numbers("data.ct_clip_percentiles", data_cfg.ct_clip_percentiles),
      foreground_samples=data_cfg.foreground_samples))


def _numbers(key: str, values) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ConfigError(f"{key}={values!r}: need numbers") from None


def load_splits(cfg: ml_collections.ConfigDict, workdir: str, barrier: Barrier
                ) -> tuple[dict[str, loader.SliceSet | volume_loader.VolumeSet], dict]:
  """Validates and preprocesses the dataset into its slice store (once), splits it by
  subject and records the split in WORKDIR/split.json. With `data.spatial_dims=3` the
  splits are whole volumes of the volume store (`load_volume_splits`)."""
  if cfg.data.spatial_dims == 3:
    return load_volume_splits(cfg, workdir, barrier)
  dataset = decathlon.read_dataset(prepare_dataset_root(cfg, workdir, barrier))
  opened = open_store(cfg, dataset, preprocess.settings_from_config(cfg.data), barrier)
  splits = _splits(cfg, workdir, opened, dataset, record=jax.process_index() == 0)
  sets = {s: loader.from_store(opened, splits[s]) for s in split.SPLITS}
  info = {"dataset": dataset.name, "root": dataset.root, "modalities": dataset.modalities,
          "labels": dataset.labels, "store": opened.path,
          "skipped": sorted(opened.meta["skipped"]),
          "volumes": {s: len(splits[s]) for s in split.SPLITS},
          "slices": {s: len(v) for s, v in sets.items()}}
  return sets, info


def load_volume_splits(cfg: ml_collections.ConfigDict, workdir: str, barrier: Barrier
                       ) -> tuple[dict[str, volume_loader.VolumeSet], dict]:
  """The 3D `load_splits`: the volume store (built once), split by subject. The info
  records what prediction repeats on a new volume: the target spacing, each channel's
  normalisation and the CT statistics."""
  dataset = decathlon.read_dataset(prepare_dataset_root(cfg, workdir, barrier))
  opened = open_store(cfg, dataset, volume_settings(cfg.data), barrier)
  splits = _splits(cfg, workdir, opened, dataset, record=jax.process_index() == 0)
  sets = {s: volume_loader.from_store(opened, splits[s], cfg.data.patch_size,
                                      cfg.data.foreground_fraction) for s in split.SPLITS}
  meta = opened.meta
  info = {"dataset": dataset.name, "root": dataset.root, "modalities": dataset.modalities,
          "labels": dataset.labels, "store": opened.path, "skipped": sorted(meta["skipped"]),
          "volumes": {s: len(splits[s]) for s in split.SPLITS}, "spatial_dims": 3,
          "target_spacing": meta["target_spacing"], "channel_names": meta["channels"],
          "normalisation": meta["normalisation"], "ct_statistics": meta["ct_statistics"],
          "patch_size": list(sets["train"].patch)}
  return sets, info


def train_batches(data: loader.SliceSet | volume_loader.VolumeSet, global_batch: int,
                  seed: int, epoch: int, process_index: int = 0, process_count: int = 1,
                  offset: int = 0, draws: int = 0) -> Iterator[dict]:
  """This process's part of each global batch of one epoch: slices (`loader`) or, from
  volumes, patches (`volume_loader`); the same order and loader position either way."""
  source = volume_loader if isinstance(data, volume_loader.VolumeSet) else loader
  return source.train_batches(data, global_batch, seed, epoch, process_index, process_count,
                              offset, draws=draws)


def _splits(cfg: ml_collections.ConfigDict, workdir: str,
            opened: store.Store | volume_store.VolumeStore,
            dataset: decathlon.Dataset, record: bool) -> dict[str, list[str]]:
  """WORKDIR/split.json if there is one, else the store's subjects (those that passed
  validation) split by `split.split_seed`, recorded there when `record`."""
  return split.recorded_split(os.path.join(workdir, "split.json"),
                              [v["name"] for v in opened.volumes], cfg.data.val_fraction,
                              cfg.data.test_fraction, split.split_seed(cfg), record=record,
                              root=dataset.root)


def cache_dir(cfg: ml_collections.ConfigDict, root: str) -> str:
  """`data.cache_dir`, or `slice_cache/` beside the dataset directory."""
  if cfg.data.cache_dir:
    return os.path.expanduser(cfg.data.cache_dir)
  return os.path.join(os.path.dirname(os.path.abspath(root)), "slice_cache")


def open_store(cfg: ml_collections.ConfigDict, dataset: decathlon.Dataset,
               settings: preprocess.Settings | volume_store.Settings,
               barrier: Barrier) -> store.Store | volume_store.VolumeStore:
  """The dataset's slice store for these settings (the volume store for volume settings),
  built by process 0 if absent, once dataset.json agrees with the settings."""
  volumes = isinstance(settings, volume_store.Settings)
  problems = validate.check_dataset(dataset, settings.case_settings() if volumes else settings)
  if problems:
    raise validate.report(problems, dataset.root)
  path = _store_path(cfg, dataset, settings)
  if jax.process_index() == 0 and not os.path.isdir(path):
    _store_kind(settings).build(path, dataset, settings, cfg.data.skip_invalid,
                                cfg.data.preprocess_workers)
  barrier("volume store" if volumes else "slice store")
  opened = volume_store.VolumeStore(path) if volumes else store.Store(path)
  skipped = opened.meta["skipped"]
  if skipped and jax.process_index() == 0:
    logging.warning("Skipped %d invalid subjects (data.skip_invalid=True):\n  %s",
                    len(skipped), "\n  ".join(p for ps in skipped.values() for p in ps))
  return opened


def _store_kind(settings: preprocess.Settings | volume_store.Settings):
  """The store module for these settings: `volume_store` for volume settings, else `store`."""
  return volume_store if isinstance(settings, volume_store.Settings) else store


def _store_path(cfg: ml_collections.ConfigDict, dataset: decathlon.Dataset,
                settings: preprocess.Settings | volume_store.Settings) -> str:
  """Where the store of `dataset` for these settings lives."""
  return _store_kind(settings).store_path(cache_dir(cfg, dataset.root), dataset, settings,
                                          cfg.data.skip_invalid)


def train_slice_count(cfg: ml_collections.ConfigDict, workdir: str, barrier: Barrier) -> int:
  """The training slices (3D: volumes) a run of `cfg` in WORKDIR trains on, without training.

  With `data.skip_invalid=True`, or when the store for these settings exists, the
  count comes from the store (built if absent: only validation, which reads every volume,
  knows the subjects a run leaves out), split as `load_splits` splits it. Otherwise it
  comes from the file headers (and, to find foreground slices, the label volumes)."""
  dataset = decathlon.read_dataset(prepare_dataset_root(cfg, workdir, barrier))
  volumes = cfg.data.spatial_dims == 3
  settings = volume_settings(cfg.data) if volumes else preprocess.settings_from_config(cfg.data)
  if cfg.data.skip_invalid or os.path.isdir(_store_path(cfg, dataset, settings)):
    opened = open_store(cfg, dataset, settings, barrier)
    rows = {v["name"]: 1 if volumes else v["stop"] - v["start"] for v in opened.volumes}
    return sum(rows[name] for name in _splits(cfg, workdir, opened, dataset, False)["train"])
  by_name = {c.name: c for c in dataset.training}
  names = split.split_cases(list(by_name), cfg.data.val_fraction, cfg.data.test_fraction,
                            split.split_seed(cfg))["train"]
  if volumes:
    return len(names)
  return sum(_header_slice_count(by_name[name], settings) for name in names)


def _header_slice_count(case: decathlon.Case, settings: preprocess.Settings) -> int:
  if settings.slice_selection == "foreground":
    label = preprocess.map_labels(decathlon.load_nifti(case.label).data,
                                  settings.label_map, case.label)
    return len(preprocess.select_slices(label, settings))
  depth = decathlon.canonical_shape(case.image)[settings.slice_axis]
  if settings.slice_selection == "all":
    return depth
  return len(preprocess.central_slices(depth, settings.slices_per_volume))


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """How many training slices, the draws of one epoch, and the steps they make at a
  device count."""

  train_slices: int
  global_batch: int
  steps_per_epoch: int
  num_steps: int
  epoch_draws: int     # slices drawn per epoch (`loader.epoch_length`)


def example_unit(data_cfg: ml_collections.ConfigDict) -> str:
  """What a training example is, for log lines and throughput keys: "slices", or with
  `data.spatial_dims=3` "patches"."""
  return "patches" if data_cfg.spatial_dims == 3 else "slices"


def epoch_plan(cfg: ml_collections.ConfigDict, train_slices: int, num_devices: int) -> EpochPlan:
  """Global batch, steps per epoch and the run's steps, for training and the LR plan alike."""
  per_device = cfg.train.per_device_batch_size
  batch = global_batch(cfg, num_devices)
  samples = augment.samples_per_epoch(cfg.data.augment)
  draws = loader.epoch_length(train_slices, samples)
  steps_per_epoch = draws // batch
  if steps_per_epoch == 0:
    unit = "volumes" if cfg.data.spatial_dims == 3 else "slices"
    what = (f"data.augment.samples_per_epoch={samples} draws per epoch" if samples
            else f"{train_slices} training {unit}")
    raise ConfigError(f"train.per_device_batch_size={per_device}: the global batch "
                      f"{batch} exceeds the {what}")
  num_steps = cfg.train.num_steps or cfg.train.num_epochs * steps_per_epoch
  return EpochPlan(train_slices, batch, steps_per_epoch, num_steps, draws)


def global_batch(cfg: ml_collections.ConfigDict, num_devices: int) -> int:
  """`train.per_device_batch_size` times the devices; the size must be positive."""
  if cfg.train.per_device_batch_size <= 0:
    raise ConfigError(f"train.per_device_batch_size={cfg.train.per_device_batch_size}: "
                      "must be positive")
  return cfg.train.per_device_batch_size * num_devices


def num_classes(cfg: ml_collections.ConfigDict, info: dict) -> int:
  return (max(cfg.data.label_map) + 1) if cfg.data.label_map else len(info["labels"])


def class_names(cfg: ml_collections.ConfigDict, info: dict) -> list[str]:
  """dataset.json's label names; a class `data.label_map` builds from several labels is
  named after them ("oedema+tumour"), one with no source label by its index."""
  labels = list(info["labels"])
  if not cfg.data.label_map:
    return labels
  sources: dict[int, list[str]] = {}
  for label, target in zip(labels, cfg.data.label_map):
    sources.setdefault(target, []).append(label)
  return ["+".join(sources[c]) if c in sources else f"class {c}"
          for c in range(num_classes(cfg, info))]
