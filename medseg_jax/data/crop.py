"""Cropping a volume to its non-zero region, as nnU-Net does before anything else: the
smallest box holding every voxel that is non-zero in any channel. Outside it an image
holds nothing but zeros (air, or the background a skull-stripped scan was set to), so
the store keeps the box only (less disk, and patches drawn where there is anatomy), and
a prediction made inside the box is background outside it."""

import numpy as np

Box = tuple[slice, slice, slice]


def nonzero_box(image: np.ndarray) -> Box:
  """The box of `image` [X,Y,Z,C] holding its non-zero voxels; the whole volume when it
  has none."""
  nonzero = np.any(image != 0, axis=-1)
  if not nonzero.any():
    return _whole(nonzero.shape)
  box = []
  for axis in range(3):
    along = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
    box.append(slice(int(along[0]), int(along[-1]) + 1))
  return tuple(box)


def region(image: np.ndarray, nonzero: bool) -> Box:
  """`nonzero_box(image)` when `nonzero`, else the whole volume."""
  return nonzero_box(image) if nonzero else _whole(image.shape[:3])


def _whole(shape) -> Box:
  return tuple(slice(0, n) for n in shape)


def shape_of(box: Box) -> list[int]:
  return [s.stop - s.start for s in box]


def to_list(box: Box) -> list[list[int]]:
  """`box` as JSON: [[start, stop], ...] per axis."""
  return [[s.start, s.stop] for s in box]


def background_outside(probs: np.ndarray, box: Box, shape: tuple) -> np.ndarray:
  """Class probabilities [.., C] of the box placed in a volume of `shape` whose other
  voxels are background (class 0) with probability 1."""
  if probs.shape[:3] == tuple(shape):
    return probs
  out = np.zeros(tuple(shape) + probs.shape[-1:], probs.dtype)
  out[..., 0] = 1
  out[box] = probs
  return out
