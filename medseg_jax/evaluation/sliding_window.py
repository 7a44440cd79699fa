"""Sliding-window inference over a whole volume [D,H,W,C], around a `run` callable.

Windows of the patch size (`data.patch_size`) start every step = floor((1 - overlap) *
patch) voxels along each axis (`evaluation.window_overlap`; at least the asked overlap)
and the last one is flush with the far border, so every voxel is covered. Along an axis
shorter than the patch the volume is padded to the patch, evenly with the odd voxel
after (as `data.patches` centres small volumes in training patches), with `pad_value`
(0: the mean of a normalised image), and the padding is cropped from the result.

Each window's probabilities are weighted by a Gaussian importance map (sigma =
`evaluation.gaussian_sigma` times the patch along each axis, centred on the middle of
the window so it is symmetric, normalised to a maximum of 1, and raised to at least
`MIN_WEIGHT`, MONAI's floor, so every voxel's weight sum is safely positive), summed
into the volume and divided by the summed weights. With `evaluation.mirror` every
window is also run flipped along each combination of the three axes (8 in all) and each
flipped back before it is summed: the mean over the flips.

Windows go to `run` in batches of a fixed size, the last padded with zeros; `run` maps
[N,d,h,w,C] to probabilities [N,d,h,w,K] and is where the caller spreads a batch over
devices and hosts. Every process calls `run` in the same order with the same shapes,
as a collective needs, given the same volume. Sums are float64 (numpy on the host), so
the weighted mean of equal float32 values is that value exactly and the result does not
depend on the batch size; the result is float32.
"""

import dataclasses
import itertools
import math
from typing import Callable, Iterator, Sequence

import numpy as np

from medseg_jax.errors import ConfigError
from medseg_jax.evaluation import mirroring

MIN_WEIGHT = 1e-3  # the importance map's floor (MONAI clamps its map to the same value)
AXES = (0, 1, 2)  # the spatial axes of a window [d,h,w,C]


def check_settings(overlap: float, gaussian_sigma: float) -> None:
  """Raises ConfigError naming `evaluation.window_overlap` or `evaluation.gaussian_sigma`."""
  if not _is_number(overlap) or not 0.0 <= overlap < 1.0:
    raise ConfigError(f"evaluation.window_overlap={overlap!r}: must be in [0, 1)")
  if not _is_number(gaussian_sigma) or not gaussian_sigma > 0.0:
    raise ConfigError(f"evaluation.gaussian_sigma={gaussian_sigma!r}: must be positive "
                      "(a fraction of the patch size, e.g. 0.125)")


@dataclasses.dataclass(frozen=True)
class Windows:
  """The settings of `sliding_window`: `patch` is `data.patch_size`, `overlap`
  `evaluation.window_overlap`, `gaussian_sigma` `evaluation.gaussian_sigma`, `mirror`
  `evaluation.mirror`; `batch` windows go to `run` at a time."""

  patch: tuple[int, int, int]
  overlap: float = 0.5
  gaussian_sigma: float = 0.125
  mirror: bool = False
  batch: int = 1

  def apply(self, volume: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`sliding_window` of `volume` [D,H,W,C] with these settings: probabilities [D,H,W,K]."""
    return sliding_window(volume, run, self.patch, overlap=self.overlap,
                          gaussian_sigma=self.gaussian_sigma, batch=self.batch,
                          mirror=self.mirror)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
  """Where the windows along one axis of `size` voxels start (one window, at 0, when the
  axis is no longer than the patch: it is padded)."""
  if size <= patch:
    return [0]
  step = max(1, math.floor(round((1.0 - overlap) * patch, 6)))
  count = -(-(size - patch) // step) + 1
  return [min(i * step, size - patch) for i in range(count)]


def window_corners(shape: Sequence[int], patch: Sequence[int],
                   overlap: float) -> list[tuple[int, int, int]]:
  """Every window's corner in a volume of spatial `shape` (padded to at least `patch`)."""
  return list(itertools.product(
      *(window_starts(s, p, overlap) for s, p in zip(shape, patch))))


def gaussian_map(patch: Sequence[int], sigma: float = 0.125,
                 floor: float = MIN_WEIGHT) -> np.ndarray:
  """The importance map [d,h,w] float64: a Gaussian of sigma `sigma` * patch per axis,
  centred on the middle of the window (between two voxels along an even axis, so it is
  symmetric), normalised to a maximum of 1 and raised to at least `floor`."""
  weights = np.ones(())
  for n in patch:
    offset = np.arange(n) - (n - 1) / 2.0  # exact halves: offset[i] == -offset[n-1-i]
    weights = np.multiply.outer(weights, np.exp(-offset**2 / (2.0 * (sigma * n)**2)))
  return np.maximum(weights / weights.max(), floor)


def sliding_window(volume: np.ndarray, run: Callable[[np.ndarray], np.ndarray],
                   patch: Sequence[int], *, overlap: float = 0.5,
                   gaussian_sigma: float = 0.125, batch: int = 1, mirror: bool = False,
                   pad_value: float = 0.0) -> np.ndarray:
  """Class probabilities [D,H,W,K] float32 of `volume` [D,H,W,C] from `run`, which maps
  `batch` windows [batch,*patch,C] to probabilities [batch,*patch,K]."""
  volume = np.asarray(volume)
  if volume.ndim != 4 or len(patch) != 3:
    raise ValueError(f"volume {volume.shape} must be [D,H,W,C], patch {patch} (d, h, w)")
  check_settings(overlap, gaussian_sigma)
  padded, crop = _pad_to(volume, patch, pad_value)
  weights = gaussian_map(patch, gaussian_sigma)
  per_class = weights[..., None]
  jobs = [(corner, axes) for corner in window_corners(padded.shape[:3], patch, overlap)
          for axes in mirroring.flips(mirror, AXES)]
  total = summed = None
  for chunk, probs in _batches(padded, jobs, patch, batch, run):
    if total is None:
      total = np.zeros(padded.shape[:3] + probs.shape[-1:], np.float64)
      summed = np.zeros(padded.shape[:3], np.float64)
    for (corner, axes), prob in zip(chunk, probs):
      where = tuple(slice(c, c + p) for c, p in zip(corner, patch))
      total[where] += per_class * np.flip(prob, axes)
      summed[where] += weights
  return (total / summed[..., None])[crop].astype(np.float32)


def _pad_to(volume: np.ndarray, patch: Sequence[int],
            pad_value: float) -> tuple[np.ndarray, tuple[slice, ...]]:
  """`volume` padded to at least `patch` along each axis, and the slices that crop the
  padding back off."""
  short = [max(p - s, 0) for s, p in zip(volume.shape[:3], patch)]
  widths = [(d // 2, d - d // 2) for d in short] + [(0, 0)]
  crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(widths, volume.shape[:3]))
  if not any(short):
    return volume, crop
  return np.pad(volume, widths, constant_values=pad_value), crop


def _batches(padded: np.ndarray, jobs: list, patch: Sequence[int], batch: int,
             run: Callable) -> Iterator[tuple[list, np.ndarray]]:
  """(jobs, their probabilities) for `batch` jobs at a time, each window flipped along
  its job's axes, the last batch padded with zero windows (their outputs dropped)."""
  if batch < 1:
    raise ValueError(f"batch={batch}")
  shape = (batch,) + tuple(patch) + padded.shape[3:]
  for start in range(0, len(jobs), batch):
    chunk = jobs[start:start + batch]
    windows = np.zeros(shape, padded.dtype)
    for i, (corner, axes) in enumerate(chunk):
      where = tuple(slice(c, c + p) for c, p in zip(corner, patch))
      windows[i] = np.flip(padded[where], axes)
    probs = np.asarray(run(windows))
    if probs.ndim != 5 or probs.shape[:4] != shape[:4]:
      raise ValueError(f"run returned {probs.shape} for windows {shape}: need "
                       f"{shape[:4]} + (classes,)")
    yield chunk, probs[:len(chunk)]
