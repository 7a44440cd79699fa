"""The volume store: every subject's whole preprocessed volume in tensorstore zarr (3D).

A store is a directory `<data.cache_dir>/<task>-volumes-<key>/`. For the i-th stored
subject it holds `image/<i>` [D,H,W,C] float32, `label/<i>` [D,H,W] uint8 and
`foreground/<i>` [N,4] int32 (rows: class, d, h, w; at most `foreground_samples` voxels
of each foreground class, evenly spaced in voxel order, sorted by class), and
`meta.json`: the settings, the target spacing, each channel's normalisation with the CT
statistics, and per subject its files, original affine and shape, canonical shape and
spacing, the box it was cropped to (`data.crop_to_nonzero`: its non-zero voxels, `crop`;
else the whole volume) with the label voxels left outside, stored shape and voxel
spacing, and its voxels per class.

A subject is read and checked by `validate.read_case` (reoriented to RAS), normalised
per channel on its own grid (cropped first when asked; `preprocess.normalise_volume`; CT statistics come from a
first pass over every training subject's labelled foreground), then resampled to the
target spacing (`resample`; default the dataset's median spacing, from the headers).
Normalising before resampling (nnU-Net's order) takes the statistics over the voxels as
acquired: z-scoring's non-zero mask is the head itself, not a rim blurred by interpolation.

Images are float32: the store reads back exactly the array the preprocessing computed;
float16 would halve the disk (compressed: 6.9 against 12.5 MB for a 160x160x128x4
phantom) but its random patch reads were no faster from the page cache (3.3 against 2.9
ms), so it saves only disk. Chunks are 32^3 voxels with all channels: a random 64^3 patch
touches at most 27 of them, and read faster than from 16^3 or 64^3 chunks (2.9 against
4.4 and 5.2 ms; BENCHMARKS.md, `benchmarks/volume_store.py`).
The key (`store.cache_key`: dataset files and settings) and the atomic build
(`store.build_atomically`) are the slice store's.
"""

import dataclasses
import json
import math
import os

import numpy as np
import tensorstore as ts
from absl import logging

from medseg_jax.data import crop, decathlon, pool, preprocess, resample, store, validate
from medseg_jax.errors import ConfigError, DataError

FORMAT = 1
CHUNK = 32            # voxels per chunk along each spatial axis
IMAGE_DTYPE = "<f4"
FOREGROUND_COLUMNS = 4  # class, d, h, w


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every setting that changes the stored volumes (plain values, picklable)."""

  modalities: tuple = ()                     # data.modalities
  label_map: tuple = ()                      # data.label_map
  target_spacing: tuple = ()                 # data.target_spacing; () = the median
  normalisation: str = "auto"                # data.volume_normalisation
  crop_nonzero: bool = False                 # data.crop_to_nonzero
  ct_clip_percentiles: tuple = (0.5, 99.5)   # data.ct_clip_percentiles
  foreground_samples: int = 10_000           # data.foreground_samples, per class

  def to_dict(self) -> dict:
    return dict(dataclasses.asdict(self), store="volumes", format=FORMAT, chunk=CHUNK,
                image_dtype=IMAGE_DTYPE, intensities=preprocess.FOREGROUND_INTENSITIES)

  def case_settings(self) -> preprocess.Settings:
    """What `validate.read_case` checks a subject against (no slice selection)."""
    return preprocess.Settings(modalities=self.modalities, label_map=self.label_map,
                               slice_selection="all")


def check_settings(s: Settings) -> Settings:
  """`s`, or a ConfigError naming the first bad key."""
  spacing = tuple(s.target_spacing)
  if spacing and (len(spacing) != 3 or not all(math.isfinite(x) and x > 0 for x in spacing)):
    raise ConfigError(f"data.target_spacing={spacing}: need () for the dataset's median "
                      "spacing, or three positive voxel sizes in mm (along the RAS axes)")
  if s.normalisation not in preprocess.VOLUME_NORMALISATIONS:
    raise ConfigError(f"data.volume_normalisation={s.normalisation!r}: choose from "
                      f"{list(preprocess.VOLUME_NORMALISATIONS)}")
  lo_hi = tuple(s.ct_clip_percentiles)
  if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 100:
    raise ConfigError(f"data.ct_clip_percentiles={lo_hi}: need (low, high) with "
                      "0 <= low < high <= 100")
  if s.foreground_samples < 1:
    raise ConfigError(f"data.foreground_samples={s.foreground_samples}: must be positive")
  if s.label_map and (min(s.label_map) < 0 or max(s.label_map) > 255):
    raise ConfigError(f"data.label_map={s.label_map}: classes must be in 0..255")
  return s


def store_path(cache_dir: str, dataset: decathlon.Dataset, settings: Settings,
               skip_invalid: bool) -> str:
  name = os.path.basename(os.path.normpath(dataset.root))
  key = store.cache_key(dataset, settings, skip_invalid)
  return os.path.join(cache_dir, f"{name}-volumes-{key}")


def channel_names(dataset: decathlon.Dataset, settings: Settings) -> tuple[str, ...]:
  """The modality names of the stored channels, in order."""
  wanted = settings.modalities or range(len(dataset.modalities))
  return tuple(dataset.modalities[preprocess.modality_index(m, dataset.modalities)]
               for m in wanted)


def build(path: str, dataset: decathlon.Dataset, settings: Settings, skip_invalid: bool,
          processes: int) -> None:
  """Validates, normalises and resamples every training subject of a dataset that passed
  `validate.check_dataset` into a new store at `path` (problems as `store.build`)."""
  store.build_atomically(path, lambda tmp: _write_volumes(tmp, dataset, settings,
                                                          skip_invalid, processes), WHAT)


def _write_volumes(tmp: str, dataset: decathlon.Dataset, settings: Settings,
                   skip_invalid: bool, processes: int) -> dict:
  processes = pool.worker_count(processes)
  target = (tuple(float(t) for t in settings.target_spacing)
            or resample.dataset_median_spacing(dataset))
  schemes = preprocess.channel_schemes(channel_names(dataset, settings),
                                       settings.normalisation)
  ct = _ct_statistics(dataset, settings, processes) if "ct" in schemes else None
  logging.info("Preprocessing %d volumes of %s at %s mm (%s) into %s with %d processes",
               len(dataset.training), dataset.root, target, schemes, tmp, processes)
  jobs = [(case, dataset, settings, target, schemes, ct) for case in dataset.training]
  volumes = []
  bad = store.ingest_all(dataset, _ingest, jobs, processes, skip_invalid,
                         lambda case, out: volumes.append(_write_volume(tmp, len(volumes), *out)))
  for v in volumes:
    if v["label_voxels_outside"]:
      logging.warning("%s: %d label voxels lie outside its non-zero box; cropped away, they "
                      "are neither trained on nor evaluated", v["label"],
                      v["label_voxels_outside"])
  return {"format": FORMAT, "dataset": dataset.name, "root": os.path.abspath(dataset.root),
          "settings": settings.to_dict(), "target_spacing": list(target),
          "channels": list(channel_names(dataset, settings)), "normalisation": list(schemes),
          "ct_statistics": ct, "volumes": volumes, "skipped": bad}


def _ct_statistics(dataset: decathlon.Dataset, settings: Settings, processes: int) -> dict:
  """`preprocess.ct_statistics` over every readable training subject's foreground (a
  first pass: the clipping bounds must be known before any volume is normalised)."""
  jobs = [(case, dataset, settings) for case in dataset.training]
  samples = [s for s in pool.pool_map(_foreground_sample, jobs, processes) if s is not None]
  stats = preprocess.ct_statistics(samples, tuple(settings.ct_clip_percentiles))
  logging.info("CT intensity statistics over %d training foreground voxels: %s",
               stats["voxels"], stats)
  return stats


def _foreground_sample(args) -> np.ndarray | None:
  """Worker: one subject's foreground intensities (None if it is invalid)."""
  case, dataset, settings = args
  problems, data = validate.read_case(case, dataset, settings.case_settings())
  return None if problems else preprocess.foreground_intensities(data.image, data.label)


def _ingest(args) -> tuple[list[str], tuple | None]:
  """Worker: one subject read, checked, normalised and resampled (or its problems)."""
  case, dataset, settings, target, schemes, ct = args
  problems, data = validate.read_case(case, dataset, settings.case_settings())
  if problems:
    return problems, None
  canonical = data.image.shape[:3]
  box = crop.region(data.image, settings.crop_nonzero)
  cropped = crop.shape_of(box)
  image = prepare_image(data.image[box], data.spacing, schemes, ct, target)
  shape = image.shape[:3]
  label = resample.resample_label(data.label[box], shape).astype(np.uint8)
  locations, counts = foreground_locations(label, settings.foreground_samples)
  info = {"name": case.name, "image": case.image, "label": case.label,
          "affine": data.affine.tolist(), "shape": list(data.shape),
          "canonical_shape": list(canonical), "original_spacing": list(data.spacing),
          "crop_box": crop.to_list(box),
          "label_voxels_outside": int(np.count_nonzero(data.label)
                                      - np.count_nonzero(data.label[box])),
          "stored_shape": list(shape),
          "spacing": [s * n / m for s, n, m in zip(data.spacing, cropped, shape)],
          "class_voxels": {str(c): n for c, n in counts.items()},
          "foreground_rows": len(locations)}
  return [], (image, label, locations, info)


def prepare_image(image: np.ndarray, spacing, schemes: tuple[str, ...], ct: dict | None,
                  target) -> np.ndarray:
  """A canonical image [X,Y,Z,C] of voxel `spacing` as the store keeps it: normalised per
  channel (`schemes`, the CT statistics `ct`), then resampled to the `target` spacing.
  Prediction prepares a new volume with the same function."""
  shape = resample.target_shape(image.shape[:3], spacing, target)
  return resample.resample_image(preprocess.normalise_volume(image, schemes, ct), shape)


def foreground_locations(label: np.ndarray, cap: int) -> tuple[np.ndarray, dict]:
  """([N,4] int32 rows (class, d, h, w): at most `cap` voxels of each foreground class,
  evenly spaced in voxel order; {class: its voxel count})."""
  rows, counts = [np.zeros((0, FOREGROUND_COLUMNS), np.int32)], {}
  for c in np.unique(label[label > 0]):
    where = np.flatnonzero(label == c)
    counts[int(c)] = len(where)
    if len(where) > cap:
      where = where[np.linspace(0, len(where) - 1, cap).round().astype(np.int64)]
    coords = np.stack(np.unravel_index(where, label.shape), axis=1)
    rows.append(np.concatenate([np.full((len(where), 1), c), coords], 1).astype(np.int32))
  return np.concatenate(rows), counts


def _write_volume(directory: str, index: int, image: np.ndarray, label: np.ndarray,
                  locations: np.ndarray, info: dict) -> dict:
  """Writes one subject's arrays as number `index`; returns its metadata entry."""
  arrays = create_arrays(directory, index, image.shape, len(locations))
  futures = [a.write(x) for a, x in zip(arrays, (image.astype(IMAGE_DTYPE), label, locations))]
  for f in futures:  # every write ends before one's error is raised and the directory removed
    f.exception()
  for f in futures:
    f.result()
  return info


def create_arrays(directory: str, index: int, shape: tuple, rows: int,
                  chunk: int = CHUNK, dtype: str = IMAGE_DTYPE) -> list[ts.TensorStore]:
  """The new image [D,H,W,C], label [D,H,W] and foreground [rows,4] arrays of subject
  `index`, chunked `chunk`^3 voxels x all channels."""
  spatial = [min(chunk, n) for n in shape[:3]]
  specs = [("image", shape, spatial + [shape[3]], dtype),
           ("label", shape[:3], spatial, "|u1"),
           ("foreground", (rows, FOREGROUND_COLUMNS), [max(rows, 1), FOREGROUND_COLUMNS],
            "<i4")]
  return [ts.open(_spec(directory, kind, index, list(s), c, d), create=True).result()
          for kind, s, c, d in specs]


def _spec(directory: str, kind: str, index: int, shape=None, chunks=None, dtype=None) -> dict:
  spec = {"driver": "zarr",
          "kvstore": {"driver": "file", "path": os.path.join(directory, kind, str(index))}}
  if shape is not None:
    spec["metadata"] = {"shape": shape, "chunks": chunks, "dtype": dtype,
                        "compressor": store.COMPRESSOR}
  return spec


WHAT = "volume store"  # how errors and barriers name this kind of store


def open_store(path: str) -> "VolumeStore":
  return VolumeStore(path)


class VolumeStore:
  """An opened volume store: its metadata; each array is opened on first use and read
  only where asked (a patch reads only the chunks it overlaps)."""

  def __init__(self, path: str):
    try:
      with open(os.path.join(path, "meta.json")) as f:
        self.meta = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"{path}: not a readable volume store ({type(e).__name__}: {e}); "
                      "delete it to rebuild")
    self.path = path
    self._arrays: dict[tuple[str, int], ts.TensorStore] = {}

  @property
  def volumes(self) -> list[dict]:
    return self.meta["volumes"]

  def indices(self, names: list[str]) -> list[int]:
    """The positions in `volumes` of the subjects `names`, in that order."""
    position = {v["name"]: i for i, v in enumerate(self.volumes)}
    return [position[n] for n in names]

  def _array(self, kind: str, index: int) -> ts.TensorStore:
    if (kind, index) not in self._arrays:
      try:
        self._arrays[kind, index] = ts.open(_spec(self.path, kind, index), open=True,
                                            read=True).result()
      except ValueError as e:
        raise DataError(f"{self.path}: {kind} {index} is not readable ({e}); delete the "
                        "store to rebuild")
    return self._arrays[kind, index]

  def fetch_patch(self, index: int, corner, size, stored_dtype: bool = False) -> "PatchRead":
    """Starts reading the box of `size` (d, h, w) voxels at `corner` (may lie partly or
    wholly outside) of volume `index`; `.result()` gives (image [d,h,w,C] float32,
    label [d,h,w] uint8), zero outside. `stored_dtype` keeps the image's stored dtype."""
    shape = self.volumes[index]["stored_shape"]
    lo = [min(max(0, int(c)), n) for c, n in zip(corner, shape)]
    hi = [max(min(n, int(c) + int(s)), l) for c, s, n, l in zip(corner, size, shape, lo)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    where = tuple(slice(a - int(c), b - int(c)) for a, b, c in zip(lo, hi, corner))
    image, label = self._array("image", index), self._array("label", index)
    dtype = image.dtype.numpy_dtype if stored_dtype else np.dtype(np.float32)
    empty = any(b <= a for a, b in zip(lo, hi))
    futures = None if empty else (image[box].read(), label[box].read())
    return PatchRead(futures, where, tuple(int(s) for s in size), image.shape[3], dtype)

  def patch(self, index: int, corner, size) -> tuple[np.ndarray, np.ndarray]:
    """(image [d,h,w,C] float32, label [d,h,w] uint8) of a box, zero outside the volume."""
    return self.fetch_patch(index, corner, size).result()

  def volume(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole stored (image float32, label uint8) of volume `index`."""
    return self.patch(index, (0, 0, 0), self.volumes[index]["stored_shape"])

  def foreground(self, index: int) -> dict[int, np.ndarray]:
    """{class: [n,3] (d, h, w) voxels of that class}, the sample recorded per class."""
    rows = np.asarray(self._array("foreground", index).read().result())
    return {int(c): rows[rows[:, 0] == c, 1:] for c in np.unique(rows[:, 0])}


class PatchRead:
  """A patch read in flight; `result()` waits and places it in a zero box."""

  def __init__(self, futures, where: tuple, size: tuple, channels: int, dtype):
    self._futures, self._where, self._size = futures, where, size
    self._channels, self._dtype = channels, dtype

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    if self._futures is not None and all(
        w.stop - w.start == n for w, n in zip(self._where, self._size)):  # wholly inside
      return (np.asarray(self._futures[0].result(), self._dtype),
              np.asarray(self._futures[1].result()))
    image = np.zeros(self._size + (self._channels,), self._dtype)
    label = np.zeros(self._size, np.uint8)
    if self._futures is not None:
      image[self._where] = self._futures[0].result()
      label[self._where] = self._futures[1].result()
    return image, label
