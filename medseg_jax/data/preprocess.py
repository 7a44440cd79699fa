"""Turning volumes into normalised, resized 2D slices."""

import numpy as np
from scipy import ndimage

from medseg_jax.errors import ConfigError, DataError


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
  if label.min() < 0:
    raise DataError(f"{path}: negative label values")
  if not label_map:
    return label.astype(np.int32)
  if label.max() >= len(label_map):
    raise DataError(f"{path}: label {label.max()} has no entry in data.label_map={label_map}")
  return np.asarray(label_map, np.int32)[label]


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


def central_slices(depth: int, count: int) -> np.ndarray:
  """Indices of the `count` central slices (all when count is 0 or larger than depth)."""
  if count <= 0 or count >= depth:
    return np.arange(depth)
  start = (depth - count) // 2
  return np.arange(start, start + count)


def to_slices(image: np.ndarray, label: np.ndarray, axis: int, count: int,
              size: int) -> tuple[np.ndarray, np.ndarray]:
  """Volumes [X,Y,Z,C], [X,Y,Z] -> slices [N,size,size,C] float32, [N,size,size] int32."""
  if axis not in (0, 1, 2):
    raise ConfigError(f"data.slice_axis={axis}: must be 0, 1 or 2")
  image = np.moveaxis(image, axis, 0)
  label = np.moveaxis(label, axis, 0)
  keep = central_slices(image.shape[0], count)
  image, label = image[keep], label[keep]
  zoom = (size / image.shape[1], size / image.shape[2])
  if zoom != (1.0, 1.0):
    image = ndimage.zoom(image, (1,) + zoom + (1,), order=1, grid_mode=True, mode="nearest")
    label = ndimage.zoom(label, (1,) + zoom, order=0, grid_mode=True, mode="nearest")
  return image.astype(np.float32), label.astype(np.int32)


def slice_spacing(spacing: tuple, shape: tuple, axis: int, size: int) -> tuple:
  """Voxel size (slice, row, column) in mm of a volume's slices after resizing to `size`."""
  in_plane = [i for i in range(3) if i != axis]
  return (spacing[axis],) + tuple(spacing[i] * shape[i] / size for i in in_plane)
