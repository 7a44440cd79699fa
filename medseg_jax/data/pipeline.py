"""The loader: subjects split by volume, slices read from the slice store, batches per host.

Process 0 builds the slice store (`store.py`) once per dataset and settings; every
process opens it and reads only the rows it feeds. Every process computes the same
epoch order from the seed and the epoch, and reads its own contiguous part of each
global batch, a few batches ahead of the one being trained on (tensorstore reads run
on its own threads while the step computes).
"""

import collections
import dataclasses
import json
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import files, parallel
from medseg_jax.data import decathlon, preprocess, store, synthetic
from medseg_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
PREFETCH = 4  # global batches read ahead (tested, and measured in benchmarks/input_pipeline.py)


@dataclasses.dataclass
class SliceSet:
  """Slices of one split, with the subject each slice came from.

  `image` and `label` are numpy arrays or `store.Rows` views read on demand; both index
  like numpy along the first axis and have `shape`."""

  image: Any           # [N,H,W,C] float32
  label: Any           # [N,H,W] int32
  volume: np.ndarray   # [N] index into `names`; a volume's slices are contiguous
  names: list[str]
  spacing: np.ndarray  # [V,3] mm between slices, rows, columns after resizing

  def __len__(self) -> int:
    return len(self.label)


def prepare_dataset_root(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """The dataset directory; writes the synthetic dataset there first if configured."""
  root = cfg.data.root or (os.path.join(workdir, "data") if cfg.data.synthetic else "")
  if not root:
    raise ConfigError("data.root: no dataset directory given (or set data.synthetic=True)")
  if cfg.data.synthetic and not os.path.exists(os.path.join(root, "dataset.json")):
    if jax.process_index() == 0:  # the others wait for it at the barrier below
      _write_synthetic(cfg, root)
  if cfg.data.synthetic:
    parallel.barrier("synthetic dataset")
  return root


def _write_synthetic(cfg: ml_collections.ConfigDict, root: str) -> None:
  if os.path.exists(root) and os.listdir(root):
    raise DataError(f"{root}: exists without dataset.json; will not write synthetic data there")
  if os.path.exists(root):
    os.rmdir(root)
  logging.info("Writing a synthetic Decathlon dataset to %s", root)
  synthetic.write_synthetic_decathlon(root, cfg.data.synthetic_volumes, num_test=2,
                                      shape=tuple(cfg.data.synthetic_shape), seed=cfg.seed)


def split_cases(cases: list, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, list]:
  """Shuffles subjects with `seed` and splits them; a subject is in exactly one split."""
  if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ConfigError("data.val_fraction and data.test_fraction must be in [0, 1) and sum below 1")
  order = np.random.default_rng(seed).permutation(len(cases))
  n_val = max(1, round(val_fraction * len(cases))) if val_fraction else 0
  n_test = max(1, round(test_fraction * len(cases))) if test_fraction else 0
  if n_val + n_test >= len(cases):
    raise ConfigError(f"data: {len(cases)} subjects are too few for the val/test fractions")
  chosen = [cases[i] for i in order]
  return {"val": chosen[:n_val], "test": chosen[n_val:n_val + n_test],
          "train": chosen[n_val + n_test:]}


def load_splits(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[dict[str, SliceSet], dict]:
  """Validates and preprocesses the dataset into its slice store (once), splits it by
  subject and records the split in WORKDIR/split.json."""
  dataset = decathlon.read_dataset(prepare_dataset_root(cfg, workdir))
  opened = open_store(cfg, dataset)
  splits = subject_splits(cfg, opened, workdir)
  if not os.path.exists(os.path.join(workdir, "split.json")) and jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "split.json"), splits)
  sets = {s: _slice_set(opened, splits[s]) for s in SPLITS}
  info = {"dataset": dataset.name, "root": dataset.root, "modalities": dataset.modalities,
          "labels": dataset.labels, "store": opened.path,
          "skipped": sorted(opened.meta["skipped"]),
          "volumes": {s: len(splits[s]) for s in SPLITS},
          "slices": {s: len(v) for s, v in sets.items()}}
  return sets, info


def subject_splits(cfg: ml_collections.ConfigDict, opened: store.Store,
                   workdir: str) -> dict[str, list[str]]:
  """The subjects of each split: WORKDIR/split.json if there is one, else the store's
  subjects (those that passed validation) split by `seed`."""
  names = [v["name"] for v in opened.volumes]
  split_path = os.path.join(workdir, "split.json")
  if not os.path.exists(split_path):
    return split_cases(names, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
  with open(split_path) as f:
    splits = json.load(f)
  missing = [n for s in splits.values() for n in s if n not in names]
  if missing:
    raise DataError(f"{split_path}: subjects {missing[:3]} are not in the slice store of "
                    f"{opened.meta['root']} (removed, or skipped as invalid)")
  return splits


def _slice_set(opened: store.Store, names: list[str]) -> SliceSet:
  image, label, volume, spacing = opened.rows(names)
  return SliceSet(image=image, label=label, volume=volume, names=list(names), spacing=spacing)


def cache_dir(cfg: ml_collections.ConfigDict, root: str) -> str:
  """`data.cache_dir`, or `slice_cache/` beside the dataset directory."""
  if cfg.data.cache_dir:
    return os.path.expanduser(cfg.data.cache_dir)
  return os.path.join(os.path.dirname(os.path.abspath(root)), "slice_cache")


def open_store(cfg: ml_collections.ConfigDict, dataset: decathlon.Dataset) -> store.Store:
  """The dataset's slice store for these settings, built by process 0 if absent."""
  settings = preprocess.settings_from_config(cfg.data)
  path = store.store_path(cache_dir(cfg, dataset.root), dataset, settings,
                          cfg.data.skip_invalid)
  if jax.process_index() == 0 and not os.path.isdir(path):
    store.build(path, dataset, settings, cfg.data.skip_invalid, cfg.data.preprocess_workers)
  parallel.barrier("slice store")
  opened = store.Store(path)
  skipped = opened.meta["skipped"]
  if skipped and jax.process_index() == 0:
    logging.warning("Skipped %d invalid subjects (data.skip_invalid=True):\n  %s",
                    len(skipped), "\n  ".join(p for ps in skipped.values() for p in ps))
  return opened


def train_slice_count(cfg: ml_collections.ConfigDict, workdir: str) -> int:
  """The training slices a run of `cfg` in WORKDIR trains on, without training.

  With `data.skip_invalid=True`, or when the slice store for these settings exists, the
  count comes from the store (built if absent: only validation, which reads every volume,
  knows the subjects a run leaves out), split as `load_splits` splits it. Otherwise it
  comes from the file headers (and, to find foreground slices, the label volumes)."""
  dataset = decathlon.read_dataset(prepare_dataset_root(cfg, workdir))
  settings = preprocess.settings_from_config(cfg.data)
  path = store.store_path(cache_dir(cfg, dataset.root), dataset, settings,
                          cfg.data.skip_invalid)
  if cfg.data.skip_invalid or os.path.isdir(path):
    opened = open_store(cfg, dataset)
    rows = {v["name"]: v["stop"] - v["start"] for v in opened.volumes}
    return sum(rows[name] for name in subject_splits(cfg, opened, workdir)["train"])
  by_name = {c.name: c for c in dataset.training}
  names = split_cases(list(by_name), cfg.data.val_fraction, cfg.data.test_fraction,
                      cfg.seed)["train"]
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
  """How many training slices, and the steps they make at a device count."""

  train_slices: int
  global_batch: int
  steps_per_epoch: int
  num_steps: int


def epoch_plan(cfg: ml_collections.ConfigDict, train_slices: int, num_devices: int) -> EpochPlan:
  """Global batch, steps per epoch and the run's steps, for training and the LR plan alike."""
  per_device = cfg.train.per_device_batch_size
  if per_device <= 0:
    raise ConfigError(f"train.per_device_batch_size={per_device}: must be positive")
  global_batch = per_device * num_devices
  steps_per_epoch = train_slices // global_batch
  if steps_per_epoch == 0:
    raise ConfigError(f"train.per_device_batch_size={per_device}: the global batch "
                      f"{global_batch} exceeds the {train_slices} training slices")
  num_steps = cfg.train.num_steps or cfg.train.num_epochs * steps_per_epoch
  return EpochPlan(train_slices, global_batch, steps_per_epoch, num_steps)


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


def epoch_order(num_slices: int, seed: int, epoch: int) -> np.ndarray:
  """The epoch's slice order: from the seed and the epoch only, so it does not depend on
  the global batch or the number of processes."""
  return np.random.default_rng([seed, epoch]).permutation(num_slices)


def train_batches(data: SliceSet, global_batch: int, seed: int, epoch: int,
                  process_index: int = 0, process_count: int = 1, offset: int = 0,
                  prefetch: int = PREFETCH) -> Iterator[dict]:
  """This process's part of each full global batch of one epoch, in a seeded order,
  starting `offset` slices into the epoch's order (the loader position a checkpoint keeps).
  Reads run `prefetch` batches ahead. Labels keep the store's integer type (uint8), which
  the steps widen on the device."""
  order = epoch_order(len(data), seed, epoch)
  local = global_batch // process_count
  rows = (order[start + process_index * local:start + (process_index + 1) * local]
          for start in range(offset, len(order) - global_batch + 1, global_batch))
  return _read_ahead(data, ((r, None) for r in rows), prefetch)


def eval_batches(data: SliceSet, global_batch: int, process_index: int = 0,
                 process_count: int = 1, prefetch: int = PREFETCH) -> Iterator[dict]:
  """Every slice once, in order; the last batch is padded and `mask` marks real slices."""
  local = global_batch // process_count

  def rows():
    for start in range(0, len(data), global_batch):
      index = np.arange(start + process_index * local, start + (process_index + 1) * local)
      valid = index < len(data)
      yield np.where(valid, index, 0), valid
  return _read_ahead(data, rows(), prefetch)


def _read_ahead(data: SliceSet, batches: Iterator, prefetch: int) -> Iterator[dict]:
  """Batches of `(rows, mask or None)`, each read while up to `prefetch` later ones are
  already being read."""
  pending = collections.deque()
  for rows, mask in batches:
    pending.append((_fetch(data.image, rows), _fetch(data.label, rows), mask))
    if len(pending) > prefetch:
      yield _batch(*pending.popleft())
  while pending:
    yield _batch(*pending.popleft())


def _fetch(array, rows: np.ndarray):
  if isinstance(array, store.Rows):
    return array.fetch(rows, stored_dtype=True)
  return store.Pending(None, array.dtype, np.asarray(array[rows]))


def _batch(image, label, mask) -> dict:
  batch = {"image": image.result(), "label": label.result()}
  if mask is not None:
    batch["mask"] = mask
  return batch
