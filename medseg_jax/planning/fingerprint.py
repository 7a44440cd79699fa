"""A dataset's fingerprint: what a plan is made from, computed once per dataset.

Per training case: its spacing (mm, along the canonical RAS axes), shape, the shape of
its bounding box of non-zero voxels (any channel; the region a store crops to), and the
voxels of each class. Per channel, over the foreground (label > 0) of every case pooled:
mean, standard deviation, median, minimum, maximum and the 0.5 and 99.5 percentiles,
from at most `SAMPLES // cases` voxels of each case (evenly spaced in voxel order), as
many as nnU-Net samples, so the fingerprint stays cheap on large datasets. And the modality
and class names of dataset.json.

`fingerprint.json` records the dataset's signature (every file's name, size and
modification time): a dataset that changed since is noticed and fingerprinted again.
"""

import hashlib
import os

import numpy as np

from medseg_jax import files
from medseg_jax.data import crop, decathlon, preprocess
from medseg_jax.data.pool import pool_map
from medseg_jax.errors import DataError

FILE = "fingerprint.json"
VERSION = 1
SAMPLES = 10 ** 8  # foreground voxels per channel over the whole dataset, at most
PERCENTILES = (0.5, 99.5)


def signature(dataset: decathlon.Dataset) -> str:
  """A hash of dataset.json and of every training file's name, size and modification
  time: it changes when a case is added, removed, replaced or edited."""
  digest = hashlib.sha256()
  paths = [os.path.join(dataset.root, "dataset.json")]
  paths += [p for case in dataset.training for p in (case.image, case.label)]
  for path in paths:
    stat = os.stat(path)
    digest.update(f"{os.path.relpath(path, dataset.root)}\0{stat.st_size}\0"
                  f"{stat.st_mtime_ns}\n".encode())
  return digest.hexdigest()


def case_record(case: decathlon.Case, modalities: int, classes: int, samples: int) -> dict:
  """One case's part of the fingerprint; its foreground intensities ([n,C], at most
  `samples` voxels) under "foreground", to be pooled."""
  image, label = decathlon.load_nifti(case.image), decathlon.load_nifti(case.label)
  data = image.data if image.data.ndim == 4 else image.data[..., None]
  if data.shape[3] != modalities:
    raise DataError(f"{case.image}: {data.shape[3]} channels, but dataset.json names "
                    f"{modalities} modalities")
  if label.data.shape != data.shape[:3]:
    raise DataError(f"{case.label}: shape {label.data.shape} differs from its image's "
                    f"{data.shape[:3]}")
  values = np.asarray(label.data).astype(np.int64)
  counts = np.bincount(values.ravel(), minlength=classes)
  return {"name": case.name, "spacing": list(image.spacing), "shape": list(data.shape[:3]),
          "cropped_shape": crop.shape_of(crop.nonzero_box(data)),
          "class_voxels": counts.tolist(),
          "foreground": preprocess.foreground_intensities(data, values, samples)}


def intensity_statistics(samples: np.ndarray) -> dict:
  """Per channel statistics of pooled foreground samples [n,C]."""
  samples = samples.astype(np.float64)
  low, high = np.percentile(samples, PERCENTILES, axis=0)
  return {"mean": samples.mean(0).tolist(), "std": samples.std(0).tolist(),
          "median": np.median(samples, axis=0).tolist(), "min": samples.min(0).tolist(),
          "max": samples.max(0).tolist(), "percentile_00_5": low.tolist(),
          "percentile_99_5": high.tolist(), "voxels": len(samples)}


def compute(dataset: decathlon.Dataset, workers: int = 1) -> dict:
  """The fingerprint of `dataset`, its cases read by `workers` worker processes."""
  cases = dataset.training
  if len(cases) < 2:
    raise DataError(f"{dataset.root}/dataset.json: {len(cases)} training case(s); a plan "
                    "needs at least 2 (one to train on, one to validate)")
  per_case = max(1, SAMPLES // len(cases))
  record = _Record(len(dataset.modalities), len(dataset.labels), per_case)
  records = list(pool_map(record, list(cases), workers))
  foreground = np.concatenate([r.pop("foreground") for r in records])
  if not len(foreground):
    raise DataError(f"{dataset.root}: no training label has a foreground voxel")
  return {"version": VERSION, "dataset": dataset.name, "signature": signature(dataset),
          "modalities": list(dataset.modalities), "labels": list(dataset.labels),
          "cases": records, "intensities": intensity_statistics(foreground)}


class _Record:
  """`case_record` with fixed arguments, picklable for the worker processes."""

  def __init__(self, modalities: int, classes: int, samples: int):
    self.modalities, self.classes, self.samples = modalities, classes, samples

  def __call__(self, case: decathlon.Case) -> dict:
    return case_record(case, self.modalities, self.classes, self.samples)


def load_or_compute(dataset: decathlon.Dataset, directory: str,
                    workers: int = 1) -> tuple[dict, str]:
  """The fingerprint in `directory`/fingerprint.json if it is the dataset's as it is now,
  else a new one, written there; and which: "unchanged", "new", or "changed" (the file
  was of the dataset as it was before)."""
  path = os.path.join(directory, FILE)
  known = files.read_json(path, FILE, missing_ok=True)
  if (isinstance(known, dict) and known.get("version") == VERSION
      and known.get("signature") == signature(dataset)):
    return known, "unchanged"
  fingerprint = compute(dataset, workers)
  files.write_json(path, fingerprint)
  return fingerprint, "new" if known is None else "changed"

