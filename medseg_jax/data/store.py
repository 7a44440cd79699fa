"""The slice store: preprocessed slices of every subject in a compressed tensorstore zarr.

A store is a directory `<data.cache_dir>/<task>-<key>/` holding two zarr arrays, `image`
[N,S,S,C] float32 and `label` [N,S,S] uint8, one chunk per slice (blosc lz4 with byte
shuffle), and `meta.json` (the settings, each subject's rows, voxel spacing, original
affine and shape, and the subjects skipped as invalid). A subject's slices are
contiguous rows. The key is a hash of dataset.json, the name, size and modification
time of every training image and label file (not their contents: hashing 7 GB of BRATS
would take longer than preprocessing it), and every setting that changes the slices, so
a changed file or setting builds a new store and an unchanged one is reused.

A store is built in a temporary directory beside its final path and renamed into place
when complete: an interrupted or failed build leaves nothing a later run would open.
"""

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import tensorstore as ts
from absl import logging

from medseg_jax import files
from medseg_jax.data import decathlon, pool, preprocess, validate
from medseg_jax.errors import DataError

FORMAT = 1
MAX_ROWS = 2**40  # the arrays grow as subjects arrive and are cut to size at the end
COMPRESSOR = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}


def cache_key(dataset: decathlon.Dataset, settings: preprocess.Settings,
              skip_invalid: bool) -> str:
  """A hash of the dataset's files (dataset.json content; names, sizes and mtimes of the
  volumes) and of every setting that changes the stored slices."""
  with open(os.path.join(dataset.root, "dataset.json"), "rb") as f:
    meta_hash = hashlib.sha256(f.read()).hexdigest()
  stats = [[os.path.relpath(p, dataset.root), *_stat(p)]
           for case in dataset.training for p in (case.image, case.label)]
  blob = json.dumps({"format": FORMAT, "dataset_json": meta_hash, "files": stats,
                     "settings": settings.to_dict(), "skip_invalid": skip_invalid},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _stat(path: str) -> list:
  try:
    st = os.stat(path)
  except OSError:
    return [None, None]
  return [st.st_size, st.st_mtime_ns]


def store_path(cache_dir: str, dataset: decathlon.Dataset, settings: preprocess.Settings,
               skip_invalid: bool) -> str:
  name = os.path.basename(os.path.normpath(dataset.root))
  return os.path.join(cache_dir, f"{name}-{cache_key(dataset, settings, skip_invalid)}")


def _array_spec(path: str, shape=None, dtype=None) -> dict:
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": path}}
  if shape is not None:
    spec["metadata"] = {"shape": list(shape), "chunks": [1] + list(shape[1:]),
                        "dtype": dtype, "compressor": COMPRESSOR}
  return spec


def _ingest(args) -> tuple[list[str], tuple | None]:
  """Worker: one subject read, checked and cut into slices (or its problems)."""
  case, dataset, settings = args
  problems, data = validate.read_case(case, dataset, settings)
  if problems:
    return problems, None
  image = preprocess.normalise(data.image, settings)
  images, labels = preprocess.to_slices(image, data.label, settings)
  spacing = preprocess.slice_spacing(data.spacing, data.image.shape[:3], settings)
  return [], (images, labels.astype(np.uint8), spacing, data.affine.tolist(), data.shape)


def build(path: str, dataset: decathlon.Dataset, settings: preprocess.Settings,
          skip_invalid: bool, processes: int) -> None:
  """Validates and preprocesses every training subject of a dataset that passed
  `validate.check_dataset` into a new store at `path`.

  Problems are collected over the whole dataset and raised together (InvalidDatasetError,
  exit code 2) unless `skip_invalid`, which leaves the bad subjects out with a warning."""
  build_atomically(path, lambda tmp: _write_slices(tmp, dataset, settings, skip_invalid,
                                                   processes), "slice store")


def build_atomically(path: str, write: Callable[[str], dict], what: str) -> None:
  """Runs `write(tmp)` in a new directory beside `path`, saves the dict it returns as
  tmp/meta.json and renames tmp to `path`. Any failure removes tmp, so a later run never
  opens a partial store; a full disk is one DataError naming `what` (e.g. "slice store")."""
  parent = os.path.dirname(path)
  try:
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  except OSError as e:
    raise DataError(f"data.cache_dir: cannot write the {what} under {parent} ({e}); "
                    "set data.cache_dir to a writable directory")
  try:
    meta = write(tmp)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f)
    try:
      os.rename(tmp, path)
    except OSError:
      if not os.path.isfile(os.path.join(path, "meta.json")):
        raise
      shutil.rmtree(tmp)  # another run built the same store meanwhile; keep theirs
  except BaseException as e:
    _remove(tmp)
    reason = files.disk_full(e) if isinstance(e, Exception) else None
    if reason:
      raise DataError(f"{path}: disk full ({reason}) while writing the {what}; free "
                      "space, or set data.cache_dir to another disk") from e
    raise


def _remove(tmp: str) -> None:
  """Removes the temporary store `tmp`, also what a failed write lands in it late."""
  if files.remove_until_gone(glob.escape(tmp), settle_seconds=0.25, limit_seconds=10.0):
    logging.warning("Could not remove the temporary store %s", tmp)


def _write_slices(tmp: str, dataset: decathlon.Dataset, settings: preprocess.Settings,
                  skip_invalid: bool, processes: int) -> dict:
  processes = pool.worker_count(processes)
  logging.info("Preprocessing %d subjects of %s into %s with %d processes",
               len(dataset.training), dataset.root, tmp, processes)
  started = time.time()
  arrays, volumes = None, []

  def keep(case, out):
    nonlocal arrays
    images, labels, spacing, affine, shape = out
    arrays = arrays or _create(tmp, images.shape[1:])
    row = volumes[-1]["stop"] if volumes else 0
    futures = [arrays[0][row:row + len(images)].write(images),
               arrays[1][row:row + len(labels)].write(labels)]
    for f in futures:  # both writes end before either's error is raised and tmp removed
      f.exception()
    for f in futures:
      f.result()
    volumes.append({"name": case.name, "image": case.image, "label": case.label,
                    "start": row, "stop": row + len(images), "spacing": list(spacing),
                    "affine": affine, "shape": list(shape)})

  jobs = [(case, dataset, settings) for case in dataset.training]
  bad = ingest_all(dataset, _ingest, jobs, processes, skip_invalid, keep)
  row = volumes[-1]["stop"]
  for array in arrays:
    array.resize(exclusive_max=[row] + [None] * (array.rank - 1), shrink_only=True,
                 resize_metadata_only=True).result()
  logging.info("Preprocessed %d slices of %d subjects in %.1f s", row, len(volumes),
               time.time() - started)
  return {"format": FORMAT, "dataset": dataset.name, "root": os.path.abspath(dataset.root),
          "settings": settings.to_dict(), "rows": row, "channels": int(arrays[0].shape[-1]),
          "volumes": volumes, "skipped": bad}


def ingest_all(dataset: decathlon.Dataset, ingest: Callable, jobs: list, processes: int,
               skip_invalid: bool, keep: Callable) -> dict[str, list[str]]:
  """Runs `ingest` (a worker: one job -> (problems, output)) over one job per training
  subject in `processes` processes and hands each valid subject's output to
  `keep(case, output)`, in dataset order. Returns the problems of the subjects left out
  (`skip_invalid`); otherwise every problem of the dataset is raised at once (as when no
  subject is valid)."""
  bad, kept = {}, 0
  results = pool.pool_map(ingest, jobs, processes)
  for case, (problems, out) in zip(dataset.training, progress(results, len(jobs))):
    if problems:
      bad[case.name] = problems
    if problems or (bad and not skip_invalid):
      continue  # keep reading: every problem is reported at once
    keep(case, out)
    kept += 1
  if bad and not skip_invalid:
    raise validate.report([p for ps in bad.values() for p in ps], dataset.root)
  if not kept:
    raise validate.report([f"{dataset.root}: no valid subject to train on"]
                          + [p for ps in bad.values() for p in ps], dataset.root)
  return bad


def _create(directory: str, slice_shape: tuple) -> tuple:
  image = ts.open(_array_spec(os.path.join(directory, "image"), (MAX_ROWS,) + slice_shape,
                              "<f4"), create=True).result()
  label = ts.open(_array_spec(os.path.join(directory, "label"),
                              (MAX_ROWS,) + slice_shape[:2], "|u1"), create=True).result()
  return image, label


def progress(results, total: int):
  """Yields `results`, showing progress: a bar on a terminal, a log line per tenth else."""
  if sys.stderr.isatty():
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    yield from tqdm(results, total=total, desc="preprocessing", unit="volume")
    return
  step = max(1, total // 10)
  for i, result in enumerate(results, 1):
    if i % step == 0 or i == total:
      logging.info("preprocessing: %d/%d subjects", i, total)
    yield result


WHAT = "slice store"  # how errors and barriers name this kind of store


def open_store(path: str) -> "Store":
  return Store(path)


class Store:
  """An opened store: metadata and the two arrays (nothing read yet)."""

  def __init__(self, path: str):
    meta_path = os.path.join(path, "meta.json")
    try:
      with open(meta_path) as f:
        self.meta = json.load(f)
      self.image = ts.open(_array_spec(os.path.join(path, "image")), open=True,
                           read=True).result()
      self.label = ts.open(_array_spec(os.path.join(path, "label")), open=True,
                           read=True).result()
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: not a readable slice store ({type(e).__name__}: {e}); "
                      "delete it to rebuild")
    self.path = path

  @property
  def volumes(self) -> list[dict]:
    return self.meta["volumes"]

  def rows(self, names: list[str]) -> "tuple[Rows, Rows, np.ndarray, np.ndarray]":
    """(image rows, label rows, volume index per row, spacing per volume) of the subjects
    `names`, in that order."""
    by_name = {v["name"]: v for v in self.volumes}
    chosen = [by_name[n] for n in names]
    rows = np.concatenate([np.arange(v["start"], v["stop"]) for v in chosen] or
                          [np.zeros(0, np.int64)])
    volume = np.concatenate([np.full(v["stop"] - v["start"], i, np.int32)
                             for i, v in enumerate(chosen)] or [np.zeros(0, np.int32)])
    spacing = np.array([v["spacing"] for v in chosen], np.float64).reshape(-1, 3)
    return (Rows(self.image, rows, np.float32), Rows(self.label, rows, np.int32), volume,
            spacing)


class Rows:
  """Some rows of a store array, read on demand: `rows[i]` reads them as numpy.

  Accepts what numpy does along the first axis (an int, a slice, an index or boolean
  array); `fetch` starts the read and returns something with `.result()`."""

  def __init__(self, array: ts.TensorStore, rows: np.ndarray, dtype):
    self._array, self._rows, self.dtype = array, rows, np.dtype(dtype)

  @property
  def shape(self) -> tuple:
    return (len(self._rows),) + tuple(self._array.shape[1:])

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def __len__(self) -> int:
    return len(self._rows)

  def fetch(self, index, stored_dtype: bool = False) -> "Pending":
    """Starts reading; `stored_dtype` keeps the store's dtype (uint8 labels: the device
    widens them, the host does not have to)."""
    rows = self._rows[index]
    dtype = self._array.dtype.numpy_dtype if stored_dtype else self.dtype
    if np.ndim(rows) == 0:
      return Pending(self._array[int(rows)].read(), dtype)
    if len(rows) == 0:
      return Pending(None, dtype, np.zeros((0,) + self.shape[1:], dtype))
    return Pending(self._array[np.asarray(rows)].read(), dtype)

  def __getitem__(self, index) -> np.ndarray:
    return self.fetch(index).result()

  def __array__(self, dtype=None, copy=None):
    out = self[:]
    return out if dtype is None else out.astype(dtype)


class Pending:
  """A read in flight; `result()` waits for it and returns numpy in the view's dtype."""

  def __init__(self, future, dtype, value=None):
    self._future, self._dtype, self._value = future, dtype, value

  def result(self) -> np.ndarray:
    if self._value is None:
      self._value = np.asarray(self._future.result(), self._dtype)
    return self._value
