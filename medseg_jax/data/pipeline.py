"""A slice loader: volumes split by subject, preprocessed once, batches sharded per host.

Process 0 preprocesses the slices into WORKDIR/slices/ (keyed by the data settings
and the split); every process memory-maps them. Every process computes the same
global batch order from the seed and the epoch, and reads only its own contiguous
part of each global batch.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import files, parallel
from medseg_jax.data import decathlon, preprocess, synthetic
from medseg_jax.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class SliceSet:
  """Preprocessed slices of one split, with the subject each slice came from."""

  image: np.ndarray    # [N,H,W,C] float32
  label: np.ndarray    # [N,H,W] int32
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


def split_cases(cases: tuple, val_fraction: float, test_fraction: float,
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
  """Reads, preprocesses and splits the dataset; records the split in WORKDIR/split.json."""
  dataset = decathlon.read_dataset(prepare_dataset_root(cfg, workdir))
  split_path = os.path.join(workdir, "split.json")
  by_name = {c.name: c for c in dataset.training}
  if os.path.exists(split_path):
    with open(split_path) as f:
      names = json.load(f)
    missing = [n for s in names.values() for n in s if n not in by_name]
    if missing:
      raise DataError(f"{split_path}: subjects {missing[:3]} are not in {dataset.root}")
    splits = {s: [by_name[n] for n in names[s]] for s in SPLITS}
  else:
    splits = split_cases(dataset.training, cfg.data.val_fraction, cfg.data.test_fraction,
                         cfg.seed)
    files.write_json(split_path, {s: [c.name for c in cases] for s, cases in splits.items()})
  sets = _preprocessed(cfg, dataset, splits, workdir)
  info = {"dataset": dataset.name, "root": dataset.root, "modalities": dataset.modalities,
          "labels": dataset.labels,
          "volumes": {s: len(c) for s, c in splits.items()},
          "slices": {s: len(v) for s, v in sets.items()}}
  return sets, info


def _preprocessed(cfg, dataset: decathlon.Dataset, splits: dict[str, list],
                  workdir: str) -> dict[str, SliceSet]:
  """The splits' slices, preprocessed once by process 0 into WORKDIR/slices/<key>/ and
  memory-mapped by every process, so each reads only the slices it feeds."""
  key = hashlib.sha256(json.dumps(
      [cfg.data.to_dict(), {s: [c.name for c in cases] for s, cases in splits.items()}],
      sort_keys=True, default=str).encode()).hexdigest()[:16]
  cache = os.path.join(workdir, "slices", key)
  if jax.process_index() == 0 and not os.path.isdir(cache):
    tmp = f"{cache}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for split, cases in splits.items():
      _save_set(os.path.join(tmp, split), _load_cases(cfg, dataset, cases))
    os.replace(tmp, cache)  # complete or absent: an interrupted run leaves no cache
  parallel.barrier("preprocessed slices")
  return {split: _open_set(os.path.join(cache, split)) for split in splits}


def _save_set(directory: str, data: SliceSet) -> None:
  os.makedirs(directory)
  for field in ("image", "label", "volume", "spacing"):
    np.save(os.path.join(directory, f"{field}.npy"), getattr(data, field))
  with open(os.path.join(directory, "names.json"), "w") as f:
    json.dump(data.names, f)


def _open_set(directory: str) -> SliceSet:
  def load(field, mode=None):
    path = os.path.join(directory, f"{field}.npy")
    try:
      return np.load(path, mmap_mode=mode)
    except ValueError:  # an empty split's arrays cannot be memory-mapped
      return np.load(path)
  with open(os.path.join(directory, "names.json")) as f:
    names = json.load(f)
  return SliceSet(image=load("image", "r"), label=load("label", "r"), volume=load("volume"),
                  names=names, spacing=load("spacing"))


def train_slice_count(cfg: ml_collections.ConfigDict, workdir: str) -> int:
  """Training slices the config yields, from file headers only (no volume is read)."""
  dataset = decathlon.read_dataset(prepare_dataset_root(cfg, workdir))
  cases = split_cases(dataset.training, cfg.data.val_fraction, cfg.data.test_fraction,
                      cfg.seed)["train"]
  depths = [decathlon.canonical_shape(c.image)[cfg.data.slice_axis] for c in cases]
  return sum(len(preprocess.central_slices(d, cfg.data.slices_per_volume)) for d in depths)


def _load_cases(cfg, dataset: decathlon.Dataset, cases: list) -> SliceSet:
  images, labels, volumes, spacings = [], [], [], []
  for index, case in enumerate(cases):
    image_vol = decathlon.load_nifti(case.image)
    label = decathlon.load_nifti(case.label).data
    image = preprocess.select_channels(image_vol.data, tuple(cfg.data.modalities),
                                       dataset.modalities, case.image)
    if image.shape[:3] != label.shape:
      raise DataError(f"{case.label}: shape {label.shape} differs from its image's "
                      f"{image.shape[:3]}")
    label = preprocess.map_labels(label, tuple(cfg.data.label_map), case.label)
    img_slices, lbl_slices = preprocess.to_slices(
        preprocess.zscore_nonzero(image), label, cfg.data.slice_axis,
        cfg.data.slices_per_volume, cfg.data.image_size)
    images.append(img_slices)
    labels.append(lbl_slices)
    volumes.append(np.full(len(lbl_slices), index, np.int32))
    spacings.append(preprocess.slice_spacing(image_vol.spacing, image.shape[:3],
                                             cfg.data.slice_axis, cfg.data.image_size))
  if not cases:
    channels = len(cfg.data.modalities) or len(dataset.modalities)
    size = cfg.data.image_size
    return SliceSet(np.zeros((0, size, size, channels), np.float32),
                    np.zeros((0, size, size), np.int32), np.zeros((0,), np.int32), [],
                    np.zeros((0, 3)))
  return SliceSet(np.concatenate(images), np.concatenate(labels), np.concatenate(volumes),
                  [c.name for c in cases], np.array(spacings))


def num_classes(cfg: ml_collections.ConfigDict, info: dict) -> int:
  return (max(cfg.data.label_map) + 1) if cfg.data.label_map else len(info["labels"])


def class_names(cfg: ml_collections.ConfigDict, info: dict) -> list[str]:
  """dataset.json's label names, or class indices when data.label_map merges labels."""
  if not cfg.data.label_map:
    return list(info["labels"])
  return ["background"] + [f"class {c}" for c in range(1, num_classes(cfg, info))]


def epoch_order(num_slices: int, seed: int, epoch: int) -> np.ndarray:
  """The epoch's slice order: from the seed and the epoch only, so it does not depend on
  the global batch or the number of processes."""
  return np.random.default_rng([seed, epoch]).permutation(num_slices)


def train_batches(data: SliceSet, global_batch: int, seed: int, epoch: int,
                  process_index: int = 0, process_count: int = 1,
                  offset: int = 0) -> Iterator[dict]:
  """This process's part of each full global batch of one epoch, in a seeded order,
  starting `offset` slices into the epoch's order (the loader position a checkpoint keeps)."""
  order = epoch_order(len(data), seed, epoch)
  local = global_batch // process_count
  for start in range(offset, len(order) - global_batch + 1, global_batch):
    rows = order[start + process_index * local:start + (process_index + 1) * local]
    yield {"image": data.image[rows], "label": data.label[rows]}


def eval_batches(data: SliceSet, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Every slice once, in order; the last batch is padded and `mask` marks real slices."""
  local = global_batch // process_count
  for start in range(0, len(data), global_batch):
    rows = np.arange(start + process_index * local, start + (process_index + 1) * local)
    valid = rows < len(data)
    rows = np.where(valid, rows, 0)
    yield {"image": data.image[rows], "label": data.label[rows], "mask": valid}
