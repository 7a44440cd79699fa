"""Patches for 3D training: which volume and where, for every draw of an epoch.

A draw is a function of (seed, epoch, index) only, so any process can compute any draw
and a resumed run draws exactly what an uninterrupted one would:

- the volume is `loader.epoch_order(num_volumes, seed, epoch, draws)[index]`: the same
  per-epoch order as the 2D slices, over volumes (each volume drawn floor or ceil of
  draws / volumes times, its repeats spread over the epoch);
- the corner comes from `np.random.default_rng([seed, epoch, index])`.

Foreground share (`data.foreground_fraction`, nnU-Net's one third by default): the last
`forced_count(global_batch, fraction)` = ceil(fraction * global_batch) draws of every
global batch are forced to contain foreground, so every global batch holds at least
that share whatever the number of devices or processes (nnU-Net rounds per local batch
instead, which changes the share with the number of GPUs). The rule is by draw index
(`index % global_batch`), so any `global_batch` consecutive draws hold exactly that many.
A forced draw picks a foreground class of its volume uniformly, one of that class's
stored voxels uniformly (`foreground_locations`), and centres the patch on it (voxel at
patch // 2 in the patch), shifted to lie inside the volume, which keeps the voxel inside.
A forced draw of a volume without foreground is a random draw (`Draw.forced` False).
A random draw's corner is uniform over the positions where the patch lies inside.

Volumes smaller than the patch along an axis are centred in the patch along it: the
corner is -((patch - size) // 2), the padding split evenly with the odd voxel after, as
the sliding window pads at inference. `cut` fills what sticks out with 0: the mean
intensity of a normalised image, and background for labels.
"""

import dataclasses
import math
from typing import Iterator, Mapping, Sequence

import numpy as np

from medseg_jax.data import loader
from medseg_jax.errors import ConfigError

Triple = tuple[int, int, int]
MAX_LOCATIONS = 10_000  # stored voxels per class and volume (nnU-Net keeps as many)


@dataclasses.dataclass(frozen=True)
class Draw:
  """One patch: the volume's index, the patch's corner (may be negative where the volume
  is smaller than the patch) and whether it was centred on a foreground voxel."""

  volume: int
  corner: Triple
  forced: bool


def check_settings(patch_size: Sequence[int], foreground_fraction: float) -> None:
  """Raises ConfigError naming `data.patch_size` or `data.foreground_fraction`."""
  if (len(patch_size) != 3 or
      not all(isinstance(p, (int, np.integer)) and p > 0 for p in patch_size)):
    raise ConfigError(f"data.patch_size={tuple(patch_size)!r}: need three positive whole "
                      "numbers (D, H, W)")
  if (not isinstance(foreground_fraction, (int, float)) or isinstance(foreground_fraction, bool)
      or not 0.0 <= foreground_fraction <= 1.0):
    raise ConfigError(f"data.foreground_fraction={foreground_fraction!r}: must be in [0, 1]")


def foreground_locations(label: np.ndarray, max_per_class: int = MAX_LOCATIONS,
                         seed: int = 0) -> dict[int, np.ndarray]:
  """Class -> [n,3] int32 voxel coordinates of that class in `label` [D,H,W] (every
  class but 0), at most `max_per_class` of them, chosen with `seed` and sorted: the
  compact foreground summary a forced draw picks its centre from, stored with the volume."""
  rng = np.random.default_rng(seed)
  found = {}
  for value in np.unique(label):
    if value == 0:
      continue
    coords = np.argwhere(label == value)
    if len(coords) > max_per_class:
      coords = coords[np.sort(rng.choice(len(coords), max_per_class, replace=False))]
    found[int(value)] = coords.astype(np.int32)
  return found


def forced_count(global_batch: int, fraction: float) -> int:
  """Draws of each global batch forced to contain foreground: ceil(fraction * batch)
  (rounded to 1e-9 first, so 0.1 * 30 is 3)."""
  return math.ceil(round(fraction * global_batch, 9))


def is_forced(index: int, global_batch: int, fraction: float) -> bool:
  """Whether draw `index` of an epoch is forced: the last `forced_count` of each batch."""
  return index % global_batch >= global_batch - forced_count(global_batch, fraction)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
  """The draws of a training split's volumes.

  `shapes` are the volumes' [D,H,W], `locations` their `foreground_locations`, in the
  split's order; `patch` is `data.patch_size`, `fraction` `data.foreground_fraction`
  and `global_batch` the global batch (devices x `train.per_device_batch_size`)."""

  shapes: tuple[Triple, ...]
  locations: tuple[Mapping[int, np.ndarray], ...]
  patch: Triple
  fraction: float
  global_batch: int

  def __post_init__(self):
    if len(self.shapes) != len(self.locations) or not self.shapes:
      raise ValueError(f"{len(self.shapes)} shapes and {len(self.locations)} locations")
    if self.global_batch < 1:
      raise ValueError(f"global_batch={self.global_batch}")
    check_settings(self.patch, self.fraction)
    for v, (shape, found) in enumerate(zip(self.shapes, self.locations)):
      for coords in found.values():
        coords = np.asarray(coords)
        if coords.size and (coords.ndim != 2 or coords.shape[1] != 3 or coords.min() < 0
                            or np.any(coords.max(0) >= shape)):
          raise ValueError(f"volume {v}: foreground locations outside its shape {shape}")

  def draw(self, seed: int, epoch: int, index: int) -> Draw:
    """Draw `index` of `epoch` (any index: epochs longer than one pass over the volumes
    continue the order with further permutations)."""
    volume = loader.epoch_order(len(self.shapes), seed, epoch, index + 1)[index]
    return self.place(seed, epoch, index, int(volume))

  def place(self, seed: int, epoch: int, index: int, volume: int) -> Draw:
    """The corner of draw `index` of `epoch`, which the epoch order gave `volume`."""
    rng = np.random.default_rng([seed, epoch, index])
    shape, patch = np.array(self.shapes[volume]), np.array(self.patch)
    found = [np.asarray(c) for _, c in sorted(self.locations[volume].items()) if len(c)]
    forced = is_forced(index, self.global_batch, self.fraction) and bool(found)
    if forced:
      coords = found[rng.integers(len(found))]
      corner = coords[rng.integers(len(coords))].astype(np.int64) - patch // 2
    else:
      corner = rng.integers(0, np.maximum(shape - patch, 0) + 1)
    inside = np.clip(corner, 0, np.maximum(shape - patch, 0))
    corner = np.where(shape < patch, -((patch - shape) // 2), inside)
    return Draw(volume, tuple(int(c) for c in corner), forced)


def global_batch_draws(sampler: Sampler, seed: int, epoch: int, process_index: int = 0,
                       process_count: int = 1, offset: int = 0,
                       draws: int = 0) -> Iterator[list[Draw]]:
  """This process's contiguous part of each full global batch of one epoch of `draws`
  patches (`data.augment.samples_per_epoch`; 0: one per volume), from `offset` draws
  into the epoch (the loader position a checkpoint keeps), as `loader.train_batches`.
  An epoch of fewer draws than the global batch has no full batch and yields nothing."""
  batch = sampler.global_batch
  if batch % process_count:
    raise ValueError(f"global batch {batch} does not split over {process_count} processes")
  order = loader.epoch_order(len(sampler.shapes), seed, epoch, draws)
  local = batch // process_count
  for start in loader.batch_starts(offset, batch, len(order)):
    rows = range(start + process_index * local, start + (process_index + 1) * local)
    yield [sampler.place(seed, epoch, i, int(order[i])) for i in rows]


def cut(array, corner: Sequence[int], patch: Sequence[int], pad_value=0) -> np.ndarray:
  """The patch of `array` ([D,H,W,...]: a numpy array or a view that slices like one and
  converts with np.asarray) at `corner`, with `pad_value` where it sticks out."""
  corner, patch = np.asarray(corner), np.asarray(patch)
  lo = np.clip(corner, 0, array.shape[:3])
  hi = np.clip(corner + patch, lo, array.shape[:3])
  region = np.asarray(array[tuple(slice(a, b) for a, b in zip(lo, hi))])
  out = np.full(tuple(patch) + tuple(region.shape[3:]), pad_value, region.dtype)
  if region.size:
    out[tuple(slice(a, b) for a, b in zip(lo - corner, hi - corner))] = region
  return out


def read_batch(images: Sequence, labels: Sequence, draws: Sequence[Draw],
               patch: Sequence[int]) -> dict[str, np.ndarray]:
  """{"image": [n,d,h,w,C], "label": [n,d,h,w]} for `draws`, cut from `images[v]`
  [D,H,W,C] and `labels[v]` [D,H,W] (labels keep their stored integer type)."""
  return {"image": np.stack([cut(images[d.volume], d.corner, patch) for d in draws]),
          "label": np.stack([cut(labels[d.volume], d.corner, patch) for d in draws])}
