"""Resampling volumes to a target voxel spacing and back, and the dataset's median spacing.

Volumes are in the canonical (RAS) voxel order of `decathlon.load_nifti`: a spacing
(s0, s1, s2) is the voxel size in mm along axes D, H, W of an image [D,H,W,C] or a label
map [D,H,W]. A grid of n voxels of size s spans n*s mm; resampling keeps that span
(scipy's `grid_mode=True`), so the new grid has round(n*s/t) voxels of size n*s/round(..),
the target t up to rounding, and going back to the original shape inverts the mapping.

Images are interpolated linearly (order 1), not with cubic splines (order 3, nnU-Net's
choice): a linear value lies between its neighbours', so the zero background stays zero
next to the head, CT values stay inside their clipping bounds and probabilities stay
non-negative and sum to one; order 3 overshoots at every sharp edge (the skull, the
volume's border after z-scoring) and took 9 times as long here (BENCHMARKS.md).

Label maps are resampled per class: each class's indicator is interpolated linearly and
every voxel takes the class of highest value (the lower class on a tie), as nnU-Net does
(it thresholds per class). Nearest neighbour picks one source voxel per target voxel,
so at non-integer ratios a boundary moves by up to half a source voxel and structures
one voxel thin vanish or double irregularly; per-class interpolation puts the boundary
where the indicators cross, the rule that also turns resampled predicted probabilities
into a label map, so training labels and predictions go through the same resampling.
"""

from typing import Sequence

import numpy as np
from scipy import ndimage

from medseg_jax.data import decathlon
from medseg_jax.errors import DataError

IMAGE_ORDER = 1  # linear; see the module docstring


def target_shape(shape: Sequence[int], spacing: Sequence[float],
                 target: Sequence[float]) -> tuple[int, int, int]:
  """The grid of `shape` voxels of `spacing` mm resampled to `target` mm:
  round(shape * spacing / target) per axis, at least one voxel."""
  return tuple(max(1, int(np.round(n * s / t))) for n, s, t in zip(shape, spacing, target))


def resample_image(image: np.ndarray, shape: Sequence[int],
                   order: int = IMAGE_ORDER) -> np.ndarray:
  """An image [D,H,W,C] on the grid `shape` [d,h,w] -> [d,h,w,C] float32, each channel
  interpolated on its own (spline `order`; linear by default). The same grid returns the
  image unchanged (a float32 copy)."""
  image = np.asarray(image)
  shape = tuple(int(n) for n in shape)
  if image.shape[:3] == shape:
    return np.array(image, np.float32)
  out = np.empty(shape + image.shape[3:], np.float32)
  for c in range(image.shape[3]):
    out[..., c] = _zoom(image[..., c].astype(np.float32), shape, order)
  return out


def resample_probabilities(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """Class probabilities [D,H,W,K] (a prediction on the target spacing) onto the grid
  `shape`, e.g. the input's canonical shape: linear interpolation keeps every voxel's
  probabilities non-negative and summing to one."""
  return resample_image(probs, shape, order=1)


def resample_label(label: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  """A label map [D,H,W] on the grid `shape`, per class: each present class's indicator
  interpolated linearly, the class of highest value kept (the lower one on a tie).
  The dtype is kept; the same grid returns the labels unchanged (a copy)."""
  label = np.asarray(label)
  shape = tuple(int(n) for n in shape)
  if label.shape == shape:
    return label.copy()
  classes = np.unique(label)
  out = np.full(shape, classes[0], label.dtype)
  if len(classes) == 1:
    return out
  best = _zoom((label == classes[0]).astype(np.float32), shape, 1)
  for c in classes[1:]:
    weight = _zoom((label == c).astype(np.float32), shape, 1)
    higher = weight > best
    out[higher] = c
    np.maximum(best, weight, out=best)
  return out


def _zoom(volume: np.ndarray, shape: tuple, order: int) -> np.ndarray:
  """One 3D array onto the grid `shape`, keeping its extent; the border value continues
  outside (the image's edge is not faded towards zero)."""
  factors = [n / m for n, m in zip(shape, volume.shape)]
  # With grid_mode=True scipy derives the exact output shape and coordinate mapping from
  # the integer shapes (input.shape * factors rounds to `shape`).
  out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True)
  if out.shape != shape:
    raise AssertionError(f"resampled to {out.shape}, wanted {shape}")
  return out


def median_spacing(spacings: Sequence[Sequence[float]]) -> tuple[float, float, float]:
  """The per-axis median of voxel spacings [(s0, s1, s2), ...]."""
  spacings = np.asarray(spacings, np.float64).reshape(-1, 3)
  if not len(spacings):
    raise ValueError("no spacings to take the median of")
  return tuple(float(s) for s in np.median(spacings, axis=0))


def dataset_spacings(dataset: decathlon.Dataset) -> dict[str, tuple[float, float, float]]:
  """Each training subject's canonical voxel spacing, from its image file's header alone;
  subjects whose header cannot be read are left out (validation reports them)."""
  found = {}
  for case in dataset.training:
    try:
      found[case.name] = decathlon.canonical_spacing(case.image)
    except DataError:
      continue
  return found


def dataset_median_spacing(dataset: decathlon.Dataset) -> tuple[float, float, float]:
  """The median canonical spacing of the dataset's training images (from the headers)."""
  spacings = dataset_spacings(dataset)
  if not spacings:
    raise DataError(f"{dataset.root}: no training image with a readable header to take "
                    "the median voxel spacing from")
  return median_spacing(list(spacings.values()))
