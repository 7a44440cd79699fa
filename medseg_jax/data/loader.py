"""The loader: the slices of a split, and each process's part of its global batches.

Every process computes the same epoch order from the seed and the epoch, and reads its
own contiguous part of each global batch, a few batches ahead of the one being trained
on (tensorstore reads run on its own threads while the step computes).
"""

import collections
import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from medseg_jax.data import store

PREFETCH = 4  # global batches read ahead (tested, and measured in benchmarks/input_pipeline.py)


@dataclasses.dataclass
class SliceSet:
  """Slices of one split, with the subject each slice came from.

  `image` and `label` are numpy arrays or `store.Rows` views read on demand; both index
  like numpy along the first axis and have `shape`."""

  image: Any           # [N,H,W,C] float32
  label: Any           # [N,H,W] int32
  volume: np.ndarray   # [N] index into `names`; a volume's slices are contiguous
  names: list[str]
  spacing: np.ndarray  # [V,3] mm between slices, rows, columns after resizing

  def __len__(self) -> int:
    return len(self.label)

  @property
  def channels(self) -> int:
    return int(self.image.shape[-1])


def from_store(opened: store.Store, names: list[str]) -> SliceSet:
  """The slices of the subjects `names`, in that order, read from the store on demand."""
  image, label, volume, spacing = opened.rows(names)
  return SliceSet(image=image, label=label, volume=volume, names=list(names), spacing=spacing)


def epoch_length(num_examples: int, samples_per_epoch: int = 0) -> int:
  """Draws in one training epoch: `data.augment.samples_per_epoch`, or one pass over the
  `num_examples` training examples (slices, or the volumes patches are drawn from) when it
  is 0. The one source of the epoch length: the plan's steps per epoch, the LR schedule's
  epochs and the loop's position all follow it."""
  return samples_per_epoch or num_examples


def batch_starts(offset: int, global_batch: int, draws: int) -> range:
  """Where each full global batch of an epoch of `draws` slices starts, from `offset` on.
  An epoch ends when no full batch is left (the loop, the loader position and the plan
  all follow this): the rest of its order is not trained on."""
  return range(offset, draws - global_batch + 1, global_batch)


@dataclasses.dataclass(frozen=True)
class Position:
  """Where the loader stands: `offset` draws into the order of epoch `epoch`."""

  epoch: int = 0
  offset: int = 0


def renumbered_step(position: Position, steps_per_epoch: int, global_batch: int) -> int:
  """The step that reaches `position` at `global_batch` slices per step: how a checkpoint
  saved at another global batch (device count) continues at the same point of training."""
  return position.epoch * steps_per_epoch + position.offset // global_batch


def after_step(position: Position, global_batch: int, epoch_draws: int) -> Position:
  """The loader position after one more step; an epoch (of `epoch_draws` slices,
  `epoch_length`) ends when no full batch is left (`batch_starts`)."""
  return epoch_start(Position(position.epoch, position.offset + global_batch), global_batch,
                     epoch_draws)


def epoch_start(position: Position, global_batch: int, epoch_draws: int) -> Position:
  """`position`, or the start of the next epoch when its epoch has no full batch left."""
  if not batch_starts(position.offset, global_batch, epoch_draws):
    return Position(position.epoch + 1, 0)
  return position


def epoch_order(num_examples: int, seed: int, epoch: int, draws: int = 0) -> np.ndarray:
  """The epoch's order of `draws` of the `num_examples` training examples (slices, or the
  volumes patches are drawn from; 0: one pass, each once): from the seed and the epoch
  only, so it does not depend on the global batch or the number of processes.

  A longer epoch is consecutive permutations of the examples cut to `draws`, so each is
  drawn floor or ceil of draws / examples times and its repeats are spread over the
  epoch; the first permutation is the one-pass order."""
  draws = epoch_length(num_examples, draws)
  rng = np.random.default_rng([seed, epoch])
  passes = -(-draws // num_examples)
  return np.concatenate([rng.permutation(num_examples) for _ in range(passes)])[:draws]


def train_batches(data: SliceSet, global_batch: int, seed: int, epoch: int,
                  process_index: int = 0, process_count: int = 1, offset: int = 0,
                  prefetch: int = PREFETCH, draws: int = 0) -> Iterator[dict]:
  """This process's part of each full global batch of one epoch of `draws` slices (0: one
  pass), in a seeded order, starting `offset` draws into the epoch's order (the loader
  position a checkpoint keeps). Reads run `prefetch` batches ahead. Labels keep the
  store's integer type (uint8), which the steps widen on the device."""
  order = epoch_order(len(data), seed, epoch, draws)
  local = global_batch // process_count
  rows = (order[start + process_index * local:start + (process_index + 1) * local]
          for start in batch_starts(offset, global_batch, len(order)))
  return _read_ahead(data, ((r, None) for r in rows), prefetch)


def eval_batches(data: SliceSet, global_batch: int, process_index: int = 0,
                 process_count: int = 1, prefetch: int = PREFETCH) -> Iterator[dict]:
  """Every slice once, in order; the last batch is padded and `mask` marks real slices."""
  local = global_batch // process_count

  def rows():
    for start in range(0, len(data), global_batch):
      index = np.arange(start + process_index * local, start + (process_index + 1) * local)
      valid = index < len(data)
      yield np.where(valid, index, 0), valid
  return _read_ahead(data, rows(), prefetch)


def _read_ahead(data: SliceSet, batches: Iterator, prefetch: int) -> Iterator[dict]:
  """Batches of `(rows, mask or None)`, each read while up to `prefetch` later ones are
  already being read."""
  pending = collections.deque()
  for rows, mask in batches:
    pending.append((_fetch(data.image, rows), _fetch(data.label, rows), mask))
    if len(pending) > prefetch:
      yield _batch(*pending.popleft())
  while pending:
    yield _batch(*pending.popleft())


def _fetch(array, rows: np.ndarray) -> Callable[[], np.ndarray]:
  """Starts reading `rows`; the returned function waits for them. In-memory arrays are
  read at once."""
  if isinstance(array, store.Rows):
    return array.fetch(rows, stored_dtype=True).result
  value = np.asarray(array[rows])
  return lambda: value


def _batch(image: Callable, label: Callable, mask) -> dict:
  batch = {"image": image(), "label": label()}
  if mask is not None:
    batch["mask"] = mask
  return batch
