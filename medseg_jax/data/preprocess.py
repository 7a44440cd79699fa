"""Turning volumes into normalised 2D slices of one in-plane size, and back (for inference);
the per-channel normalisation of whole volumes (3D: z-score for MRI, clip then z-score
with the training foreground's statistics for CT)."""

import dataclasses

import numpy as np
from scipy import ndimage

from medseg_jax.errors import ConfigError, DataError

SELECTIONS = ("central", "all", "foreground")
RESIZE_MODES = ("resize", "pad_crop")
NORMALISATIONS = ("zscore_nonzero", "percentile")
VOLUME_NORMALISATIONS = ("auto", "ct", "mri", "zscore")  # auto: CT for a modality named CT
FOREGROUND_INTENSITIES = 100_000  # voxels per subject and channel behind the CT statistics


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every `data.*` setting that changes the preprocessed slices (plain values, picklable)."""

  modalities: tuple = ()
  label_map: tuple = ()
  slice_axis: int = 2
  slice_selection: str = "central"
  slices_per_volume: int = 70
  empty_slice_fraction: float = 0.0
  image_size: int = 240
  resize: str = "resize"
  normalisation: str = "zscore_nonzero"
  clip_percentiles: tuple = (0.5, 99.5)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def settings_from_config(data_cfg) -> Settings:
  """The preprocessing settings of a `data` config section; a bad value is a ConfigError."""
  s = Settings(modalities=tuple(data_cfg.modalities), label_map=tuple(data_cfg.label_map),
               slice_axis=data_cfg.slice_axis, slice_selection=data_cfg.slice_selection,
               slices_per_volume=data_cfg.slices_per_volume,
               empty_slice_fraction=float(data_cfg.empty_slice_fraction),
               image_size=data_cfg.image_size, resize=data_cfg.resize,
               normalisation=data_cfg.normalisation,
               clip_percentiles=tuple(float(p) for p in data_cfg.clip_percentiles))
  _check_choice("data.slice_selection", s.slice_selection, SELECTIONS)
  _check_choice("data.resize", s.resize, RESIZE_MODES)
  _check_choice("data.normalisation", s.normalisation, NORMALISATIONS)
  if s.slice_axis not in (0, 1, 2):
    raise ConfigError(f"data.slice_axis={s.slice_axis}: must be 0, 1 or 2")
  if s.image_size <= 0:
    raise ConfigError(f"data.image_size={s.image_size}: must be positive")
  if s.slices_per_volume < 0:
    raise ConfigError(f"data.slices_per_volume={s.slices_per_volume}: must be 0 (all) or more")
  if not 0 <= s.empty_slice_fraction <= 1:
    raise ConfigError(f"data.empty_slice_fraction={s.empty_slice_fraction}: must be in [0, 1]")
  lo_hi = s.clip_percentiles
  if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 100:
    raise ConfigError(f"data.clip_percentiles={lo_hi}: need (low, high) with "
                      "0 <= low < high <= 100")
  if s.label_map and (min(s.label_map) < 0 or max(s.label_map) > 255):
    raise ConfigError(f"data.label_map={s.label_map}: classes must be in 0..255")
  return s


def _check_choice(key: str, value: str, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f"{key}={value!r}: choose from {list(choices)}")


def select_channels(image: np.ndarray, wanted: tuple, available: tuple[str, ...],
                    path: str) -> np.ndarray:
  """[X,Y,Z] or [X,Y,Z,M] -> [X,Y,Z,C] with the wanted modalities (names or indices)."""
  if image.ndim == 3:
    image = image[..., None]
  if image.ndim != 4 or image.shape[-1] != len(available):
    raise DataError(f"{path}: expected {len(available)} modalities {available}, "
                    f"got an array of shape {image.shape}")
  indices = [modality_index(m, available) for m in wanted] or list(range(len(available)))
  return image[..., indices]


def modality_index(modality, available: tuple[str, ...]) -> int:
  if isinstance(modality, int) and 0 <= modality < len(available):
    return modality
  if modality in available:
    return available.index(modality)
  raise ConfigError(f"data.modalities: {modality!r} is not among the dataset's {available}")


def map_labels(label: np.ndarray, label_map: tuple[int, ...], path: str) -> np.ndarray:
  """Source label i -> class label_map[i]; an empty map keeps the labels as they are."""
  label = np.rint(label).astype(np.int64)
  if label.size and label.min() < 0:
    raise DataError(f"{path}: negative label values")
  if not label_map:
    return label.astype(np.int32)
  if label.size and label.max() >= len(label_map):
    raise DataError(f"{path}: label {label.max()} has no entry in data.label_map={label_map}")
  return np.asarray(label_map, np.int32)[label]


def normalise(image: np.ndarray, settings: Settings) -> np.ndarray:
  if settings.normalisation == "percentile":
    return percentile_clip(image, *settings.clip_percentiles)
  return zscore_nonzero(image)


def zscore_nonzero(image: np.ndarray) -> np.ndarray:
  """Per-channel z-score over the non-zero voxels (the head); background stays 0."""
  out = np.zeros_like(image, dtype=np.float32)
  for c in range(image.shape[-1]):
    channel = image[..., c].astype(np.float32)
    inside = channel != 0
    if inside.any():
      mean, std = channel[inside].mean(), channel[inside].std()
      out[..., c] = np.where(inside, (channel - mean) / max(std, 1e-6), 0.0)
  return out


def percentile_clip(image: np.ndarray, low: float, high: float) -> np.ndarray:
  """Per channel: clip to the [low, high] percentiles of all its voxels, rescale to [0, 1]."""
  out = np.zeros_like(image, dtype=np.float32)
  for c in range(image.shape[-1]):
    channel = image[..., c].astype(np.float32)
    lo, hi = np.percentile(channel, [low, high])
    if hi > lo:
      out[..., c] = (np.clip(channel, lo, hi) - lo) / (hi - lo)
  return out


def channel_schemes(names: tuple[str, ...], forced: str = "auto") -> tuple[str, ...]:
  """The volume normalisation of each channel named `names`: `forced` ("ct" or "mri") for
  all, or with "auto" "ct" for a modality named CT (any case), "mri" for any other."""
  if forced != "auto":
    return (forced,) * len(names)
  return tuple("ct" if str(n).casefold() == "ct" else "mri" for n in names)


def foreground_intensities(image: np.ndarray, label: np.ndarray,
                           cap: int = FOREGROUND_INTENSITIES) -> np.ndarray:
  """Intensities [n,C] of the voxels where `label` > 0 (image [X,Y,Z,C], label [X,Y,Z]);
  of more than `cap` voxels, `cap` evenly spaced in voxel order."""
  inside = np.flatnonzero(label > 0)
  if len(inside) > cap:
    inside = inside[np.linspace(0, len(inside) - 1, cap).round().astype(np.int64)]
  return image.reshape(-1, image.shape[-1])[inside].astype(np.float32)


def ct_statistics(samples: list[np.ndarray], percentiles: tuple[float, float]) -> dict:
  """Per channel, from the foreground intensities of every training volume [n_i,C]
  pooled: the `percentiles` (low, high) to clip to, and the mean and standard deviation
  of the (unclipped) foreground, as nnU-Net's CT normalisation takes them."""
  pooled = np.concatenate(samples).astype(np.float64) if samples else np.zeros((0, 0))
  if not len(pooled):
    raise DataError("no foreground voxel in the training labels to take the CT intensity "
                    "statistics from (set the normalisation to mri)")
  low, high = np.percentile(pooled, percentiles, axis=0)
  return {"low": low.tolist(), "high": high.tolist(), "mean": pooled.mean(0).tolist(),
          "std": pooled.std(0).tolist(), "voxels": len(pooled)}


def normalise_volume(image: np.ndarray, schemes: tuple[str, ...],
                     ct: dict | None = None) -> np.ndarray:
  """Image [X,Y,Z,C] -> float32, per channel: "mri" z-scored over its non-zero voxels
  (`zscore_nonzero`), "zscore" over all its voxels, "ct" clipped to `ct`'s bounds, then
  z-scored with its mean and standard deviation (`ct_statistics`)."""
  out = np.empty(image.shape, np.float32)
  for c, scheme in enumerate(schemes):
    channel = image[..., c:c + 1]
    if scheme == "ct":
      clipped = np.clip(channel.astype(np.float64), ct["low"][c], ct["high"][c])
      out[..., c:c + 1] = (clipped - ct["mean"][c]) / max(ct["std"][c], 1e-6)
    elif scheme == "zscore":
      values = channel.astype(np.float64)
      out[..., c:c + 1] = (values - values.mean()) / max(values.std(), 1e-6)
    else:
      out[..., c:c + 1] = zscore_nonzero(channel)
  return out


def central_slices(depth: int, count: int) -> np.ndarray:
  """Indices of the `count` central slices (all when count is 0 or larger than depth)."""
  if count <= 0 or count >= depth:
    return np.arange(depth)
  start = (depth - count) // 2
  return np.arange(start, start + count)


def foreground_slices(has_foreground: np.ndarray, empty_fraction: float) -> np.ndarray:
  """Every slice with foreground, plus `empty_fraction` of the empty ones, evenly spaced."""
  full = np.flatnonzero(has_foreground)
  empty = np.flatnonzero(~has_foreground)
  keep = int(round(empty_fraction * len(empty)))
  if keep:
    empty = empty[np.linspace(0, len(empty) - 1, keep).round().astype(int)]
    return np.sort(np.concatenate([full, empty]))
  return full


def select_slices(label: np.ndarray, settings: Settings) -> np.ndarray:
  """Indices along the slice axis of the slices to keep, from the (mapped) label volume."""
  depth = label.shape[settings.slice_axis]
  if settings.slice_selection == "all":
    return np.arange(depth)
  if settings.slice_selection == "foreground":
    other = tuple(i for i in range(3) if i != settings.slice_axis)
    return foreground_slices((label > 0).any(axis=other), settings.empty_slice_fraction)
  return central_slices(depth, settings.slices_per_volume)


def to_slices(image: np.ndarray, label: np.ndarray, settings: Settings,
              keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Volumes [X,Y,Z,C], [X,Y,Z] -> slices [N,S,S,C] float32, [N,S,S] int32 (S = image_size),
  keeping the slices `keep` (default: `select_slices`)."""
  keep = select_slices(label, settings) if keep is None else keep
  image = np.moveaxis(image, settings.slice_axis, 0)[keep]
  label = np.moveaxis(label, settings.slice_axis, 0)[keep]
  size = settings.image_size
  if settings.resize == "pad_crop":
    return pad_crop(image, size).astype(np.float32), pad_crop(label, size).astype(np.int32)
  zoom = (size / image.shape[1], size / image.shape[2])
  if zoom != (1.0, 1.0):
    image = ndimage.zoom(image, (1,) + zoom + (1,), order=1, grid_mode=True, mode="nearest")
    label = ndimage.zoom(label, (1,) + zoom, order=0, grid_mode=True, mode="nearest")
  return image.astype(np.float32), label.astype(np.int32)


def pad_crop(slices: np.ndarray, size: int) -> np.ndarray:
  """[N,H,W,...] -> [N,size,size,...]: centred crop of a larger plane, zero padding of a
  smaller one (the extra pixel of an odd difference goes after)."""
  out = slices
  for axis in (1, 2):
    extent = out.shape[axis]
    if extent > size:
      start = (extent - size) // 2
      out = np.take(out, np.arange(start, start + size), axis=axis)
    elif extent < size:
      widths = [(0, 0)] * out.ndim
      widths[axis] = ((size - extent) // 2, size - extent - (size - extent) // 2)
      out = np.pad(out, widths)
  return out


def from_slices(probs: np.ndarray, in_plane: tuple[int, int], settings: Settings) -> np.ndarray:
  """Undoes the in-plane resizing or pad/crop of slice outputs [N,S,S,C] -> [N,h,w,C]."""
  size = settings.image_size
  if settings.resize == "pad_crop":
    out = probs
    for axis, extent in zip((1, 2), in_plane):
      if extent < size:  # padded: take the middle back
        start = (size - extent) // 2
        out = np.take(out, np.arange(start, start + extent), axis=axis)
      elif extent > size:  # cropped: the cut-off border is predicted as background
        widths = [(0, 0)] * out.ndim
        widths[axis] = ((extent - size) // 2, extent - size - (extent - size) // 2)
        border = np.zeros(out.shape[-1], out.dtype)
        border[0] = 1
        out = np.pad(out, widths)
        out[_outside(out.shape, axis, widths[axis])] = border
    return out
  zoom = (1, in_plane[0] / size, in_plane[1] / size, 1)
  if zoom != (1, 1.0, 1.0, 1):
    probs = ndimage.zoom(probs, zoom, order=1, grid_mode=True, mode="nearest")
  return probs


def _outside(shape: tuple, axis: int, widths: tuple[int, int]) -> tuple:
  """Index of the padded border along `axis` (all other axes whole)."""
  mask = np.zeros(shape[axis], bool)
  mask[:widths[0]] = True
  mask[shape[axis] - widths[1]:] = True
  index = [slice(None)] * (len(shape) - 1)
  index[axis] = mask
  return tuple(index)


def slice_spacing(spacing: tuple, shape: tuple, settings: Settings) -> tuple:
  """Voxel size (slice, row, column) in mm of a volume's slices after resizing."""
  axis = settings.slice_axis
  in_plane = [i for i in range(3) if i != axis]
  if settings.resize == "pad_crop":
    return (spacing[axis],) + tuple(spacing[i] for i in in_plane)
  size = settings.image_size
  return (spacing[axis],) + tuple(spacing[i] * shape[i] / size for i in in_plane)
