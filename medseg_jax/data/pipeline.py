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
  (3D: resample, volume_store, patches and volume_loader in their place: whole volumes
  at one voxel spacing, and patches drawn from them)

The steps both kinds of example share live here and take the shared settings
(`source.Source`); what differs between slices and volumes is chosen once, by the kind
of data (`medseg_jax.kinds`), which hands these functions its store module and settings.

Process 0 builds the slice store once per dataset and settings; every process opens it
and reads only the rows it feeds. The functions that write for every process take the
`barrier` they wait at (`parallel.multihost.barrier`: the data stage sits below the
parallel one and is handed it).
"""

import dataclasses
import os
from types import ModuleType
from typing import Callable

import jax
from absl import logging

from medseg_jax.data import decathlon, loader, split, synthetic, validate
from medseg_jax.data.source import Source
from medseg_jax.errors import ConfigError, DataError

Barrier = Callable[[str], None]  # waits until every process reaches the named point


def dataset_root(source: Source, workdir: str) -> tuple[str, bool]:
  """The dataset directory, and whether the synthetic dataset is to be written there.

  Reads no data and writes nothing. Synthetic data (`data.synthetic=True`) goes only
  where the run owns the place, WORKDIR/data when `data.root` is empty, or into a
  `data.root` that is an existing empty directory (the user made it for this). Any
  other `data.root` must hold a dataset, so a misspelt path is "not found", never a
  fresh synthetic dataset.
  """
  if not source.root:
    if not source.synthetic:
      raise ConfigError("data.root: no dataset directory given (or set data.synthetic=True)")
    root = os.path.join(workdir, "data")
    return root, not os.path.exists(os.path.join(root, "dataset.json"))
  root = source.root
  if os.path.exists(os.path.join(root, "dataset.json")):
    return root, False
  if source.synthetic and os.path.isdir(root) and not os.listdir(root):
    return root, True
  hint = (" (data.synthetic=True writes a synthetic dataset only into WORKDIR/data, with "
          "data.root empty, or into an existing empty data.root)" if source.synthetic else "")
  raise DataError(f"{os.path.join(root, 'dataset.json')}: not found (data.root must be a "
                  f"Decathlon task directory){hint}")


def check_dataset_root(source: Source, workdir: str) -> None:
  """Raises the error `dataset_root` would raise (the directory is missing, holds no
  dataset, or is not the run's to write into), reading no data: a check before data work."""
  dataset_root(source, workdir)


def prepare_dataset_root(source: Source, workdir: str, barrier: Barrier) -> str:
  """The dataset directory; writes the synthetic dataset there first if configured."""
  root, write = dataset_root(source, workdir)
  if write and jax.process_index() == 0:  # the others wait for it at the barrier below
    _write_synthetic(source, root)
  if source.synthetic:
    barrier("synthetic dataset")
  return root


def read_dataset(source: Source, workdir: str, barrier: Barrier) -> decathlon.Dataset:
  """dataset.json of the run's dataset (`prepare_dataset_root`)."""
  return decathlon.read_dataset(prepare_dataset_root(source, workdir, barrier))


def _write_synthetic(source: Source, root: str) -> None:
  if os.path.exists(root) and os.listdir(root):
    raise DataError(f"{root}: exists without dataset.json; will not write synthetic data there")
  logging.info("Writing a synthetic Decathlon dataset to %s", root)
  # An empty `root` stays in place until the complete dataset replaces it, so another
  # process never sees it missing.
  synthetic.write_synthetic_decathlon(root, source.synthetic_volumes, num_test=2,
                                      shape=tuple(source.synthetic_shape),
                                      seed=source.split_seed)


def numbers(key: str, values) -> tuple[float, ...]:
  """`values` as floats, or a ConfigError naming the config `key`."""
  try:
    return tuple(float(v) for v in values)
  except (TypeError, ValueError):
    raise ConfigError(f"{key}={values!r}: need numbers") from None


def splits(source: Source, workdir: str, opened, dataset: decathlon.Dataset,
           record: bool) -> dict[str, list[str]]:
  """WORKDIR/split.json if there is one, else the store's subjects (those that passed
  validation) split by `source.split_seed`, recorded there when `record`."""
  return split.recorded_split(os.path.join(workdir, "split.json"),
                              [v["name"] for v in opened.volumes], source.val_fraction,
                              source.test_fraction, source.split_seed, record=record,
                              root=dataset.root, fold=source.fold,
                              num_folds=source.num_folds)


def new_split(source: Source, dataset: decathlon.Dataset) -> dict[str, list[str]]:
  """The split of every subject of dataset.json a new run would draw (no store read)."""
  return split.split_cases([c.name for c in dataset.training], source.val_fraction,
                           source.test_fraction, source.split_seed, source.fold,
                           source.num_folds)


def common_info(dataset: decathlon.Dataset, opened, chosen: dict[str, list[str]]) -> dict:
  """What data_info.json records of any dataset and store: names, labels, the store's
  path, the subjects skipped and the volumes per split."""
  return {"dataset": dataset.name, "root": dataset.root, "modalities": dataset.modalities,
          "labels": dataset.labels, "store": opened.path,
          "skipped": sorted(opened.meta["skipped"]),
          "volumes": {s: len(chosen[s]) for s in split.SPLITS}}


def cache_dir(source: Source, root: str) -> str:
  """`data.cache_dir`, or `slice_cache/` beside the dataset directory."""
  if source.cache_dir:
    return os.path.expanduser(source.cache_dir)
  return os.path.join(os.path.dirname(os.path.abspath(root)), "slice_cache")


def store_path(source: Source, dataset: decathlon.Dataset, kind: ModuleType, settings) -> str:
  """Where the store of `dataset` for these settings lives; `kind` is the store module
  (`store` for slices, `volume_store` for volumes)."""
  return kind.store_path(cache_dir(source, dataset.root), dataset, settings,
                         source.skip_invalid)


def open_store(source: Source, dataset: decathlon.Dataset, kind: ModuleType, settings,
               case_settings, barrier: Barrier):
  """The dataset's store (of the store module `kind`) for these settings, built by process
  0 if absent, once dataset.json agrees with `case_settings` (what each subject is read
  and checked against)."""
  problems = validate.check_dataset(dataset, case_settings)
  if problems:
    raise validate.report(problems, dataset.root)
  path = store_path(source, dataset, kind, settings)
  if jax.process_index() == 0 and not os.path.isdir(path):
    kind.build(path, dataset, settings, source.skip_invalid, source.preprocess_workers)
  barrier(kind.WHAT)
  opened = kind.open_store(path)
  skipped = opened.meta["skipped"]
  if skipped and jax.process_index() == 0:
    logging.warning("Skipped %d invalid subjects (data.skip_invalid=True):\n  %s",
                    len(skipped), "\n  ".join(p for ps in skipped.values() for p in ps))
  return opened


@dataclasses.dataclass(frozen=True)
class EpochPlan:
  """How many training examples there are to draw from, the draws of one epoch, and the
  steps they make at a device count."""

  train_examples: int  # training slices, or volumes that patches are drawn from
  global_batch: int
  steps_per_epoch: int
  num_steps: int
  epoch_draws: int     # examples (slices or patches) drawn per epoch (`loader.epoch_length`)


def epoch_plan(train_examples: int, counted: str, samples_per_epoch: int,
               per_device_batch: int, num_devices: int, num_epochs: int,
               num_steps: int = 0) -> EpochPlan:
  """Global batch, steps per epoch and the run's steps (`num_steps`, or `num_epochs`
  epochs), for training and the LR plan alike; `counted` names what the training set is
  counted in (slices, volumes) for the error of a batch larger than an epoch."""
  batch = global_batch(per_device_batch, num_devices)
  draws = loader.epoch_length(train_examples, samples_per_epoch)
  steps_per_epoch = draws // batch
  if steps_per_epoch == 0:
    what = (f"data.augment.samples_per_epoch={samples_per_epoch} draws per epoch"
            if samples_per_epoch else f"{train_examples} training {counted}")
    raise ConfigError(f"train.per_device_batch_size={per_device_batch}: the global batch "
                      f"{batch} exceeds the {what}")
  return EpochPlan(train_examples, batch, steps_per_epoch,
                   num_steps or num_epochs * steps_per_epoch, draws)


def global_batch(per_device_batch: int, num_devices: int) -> int:
  """`train.per_device_batch_size` times the devices; the size must be positive."""
  if per_device_batch <= 0:
    raise ConfigError(f"train.per_device_batch_size={per_device_batch}: must be positive")
  return per_device_batch * num_devices
