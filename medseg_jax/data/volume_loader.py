"""The 3D loader: a split's stored volumes, and each process's part of its patch batches.

The counterpart of `loader` for volumes (`kinds.Volumes`). An epoch is `loader.epoch_length`
draws over the training volumes (`data.augment.samples_per_epoch` patches, or one per
volume); draw i of an epoch is `patches.Sampler.place(seed, epoch, i, volume)`, so the
loader position a checkpoint keeps (epoch, offset into the epoch's order) names the same
patches whatever the number of devices or processes. Each process reads only the patches
of its contiguous part of every global batch (`patches.global_batch_draws`), a few batches
ahead: the volume store's reads run on tensorstore's threads while the step computes.
"""

import collections
import dataclasses
import functools
from typing import Iterator

import numpy as np

from medseg_jax.data import loader, patches, volume_store


@dataclasses.dataclass
class VolumeSet:
  """The stored volumes of one split, in the split's order, read on demand.

  `patch` is `data.patch_size`, `fraction` `data.foreground_fraction`: what training
  patches are drawn with."""

  store: volume_store.VolumeStore
  indices: list[int]   # positions of the split's volumes in the store
  names: list[str]
  patch: tuple[int, int, int]
  fraction: float

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def channels(self) -> int:
    return len(self.store.meta["channels"])

  @property
  def shapes(self) -> tuple[tuple[int, int, int], ...]:
    """Each volume's stored [D,H,W] (at the target spacing)."""
    return tuple(tuple(self.store.volumes[i]["stored_shape"]) for i in self.indices)

  @property
  def spacing(self) -> np.ndarray:
    """[V,3] each volume's stored voxel size in mm along D, H, W."""
    return np.array([self.store.volumes[i]["spacing"] for i in self.indices], np.float64)

  def volume(self, v: int) -> tuple[np.ndarray, np.ndarray]:
    """(image [D,H,W,C] float32, label [D,H,W] uint8) of the split's volume `v`."""
    return self.store.volume(self.indices[v])

  @functools.cached_property
  def locations(self) -> tuple[dict[int, np.ndarray], ...]:
    """Each volume's stored foreground voxels by class (read once)."""
    return tuple(self.store.foreground(i) for i in self.indices)

  def sampler(self, global_batch: int) -> patches.Sampler:
    """The patch draws of this split for a global batch of `global_batch` patches."""
    return patches.Sampler(self.shapes, self.locations, self.patch, self.fraction,
                           global_batch)


def from_store(opened: volume_store.VolumeStore, names: list[str], patch, fraction: float
               ) -> VolumeSet:
  """The volumes of the subjects `names`, in that order."""
  return VolumeSet(store=opened, indices=opened.indices(names), names=list(names),
                   patch=tuple(int(p) for p in patch), fraction=float(fraction))


def train_batches(data: VolumeSet, global_batch: int, seed: int, epoch: int,
                  process_index: int = 0, process_count: int = 1, offset: int = 0,
                  prefetch: int = loader.PREFETCH, draws: int = 0) -> Iterator[dict]:
  """This process's patches of each full global batch of one epoch of `draws` patches
  (0: one per volume), from `offset` draws into the epoch, as `loader.train_batches`
  gives slices: {"image": [n,d,h,w,C] float32, "label": [n,d,h,w] uint8}."""
  sampler = data.sampler(global_batch)
  pending = collections.deque()
  for local in patches.global_batch_draws(sampler, seed, epoch, process_index,
                                          process_count, offset, draws):
    pending.append([data.store.fetch_patch(data.indices[d.volume], d.corner, data.patch)
                    for d in local])
    if len(pending) > prefetch:
      yield _batch(pending.popleft())
  while pending:
    yield _batch(pending.popleft())


def _batch(reads: list[volume_store.PatchRead]) -> dict:
  images, labels = zip(*(r.result() for r in reads))
  return {"image": np.stack(images), "label": np.stack(labels)}
