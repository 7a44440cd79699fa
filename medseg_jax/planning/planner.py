"""The 2D and 3D plans of a fingerprint for a machine: what follows from the data comes
from planning/rules.py; the patch and the batch from the memory of the compiled train step
(planning/memory.py), measured for a few candidates and interpolated for the rest."""

import dataclasses
from typing import Callable

import ml_collections
import numpy as np

from medseg_jax import config_schema, defaults
from medseg_jax.errors import ConfigError
from medseg_jax.planning import memory, rules
from medseg_jax.planning.rules import Choice

MIN_DEVICE_BATCH = 2  # a patch (or slice) shrinks until this batch fits a device (nnU-Net's)

# (cfg, per-device batch) -> bytes of the compiled train step
PeakFn = Callable[[ml_collections.ConfigDict, int], float]


@dataclasses.dataclass(frozen=True)
class Machine:
  budget: int         # bytes a train step may use on each device
  budget_source: str  # where that figure comes from, in words
  num_devices: int


@dataclasses.dataclass(frozen=True)
class TimeBudget:
  seconds: float                                       # the training run's wall time
  timer: Callable[[ml_collections.ConfigDict], float]  # a config -> seconds per train step


def config_of(choices: list[Choice]) -> ml_collections.ConfigDict:
  """The defaults with `choices` set: the config the written plan loads as."""
  cfg = defaults.get_config()
  for c in choices:
    config_schema.assign(cfg, c.key, c.value)
  return cfg


def data_choices(root: str, dims: int, normalisation: Choice) -> list[Choice]:
  """The dataset and what is read of it."""
  return [Choice("data.root", root, "the dataset planned"),
          Choice("data.spatial_dims", dims, f"the {dims}D plan"), normalisation]


def peak_fn(fingerprint: dict) -> PeakFn:
  """The compiled step's memory for a config of this dataset's classes and channels, each
  (config, batch) compiled once (the patch estimate and the batch search share some)."""
  classes, channels = len(fingerprint["labels"]), len(fingerprint["modalities"])
  known = {}

  def peak(cfg: ml_collections.ConfigDict, batch: int) -> float:
    key = (cfg.to_json(sort_keys=True), batch)
    if key not in known:
      known[key] = memory.step_peak(cfg, batch, classes, channels)
    return known[key]
  return peak


def plan_3d(fingerprint: dict, root: str, machine: Machine, peak: PeakFn,
            time_budget: TimeBudget | None = None) -> list[Choice]:
  """The 3D plan: target spacing, patch, pooling, network, batch, schedule; with a
  `time_budget`, the width and patch that budget trains best, and its steps."""
  spacing, spacing_rule = rules.target_spacing(fingerprint)
  shape = rules.median_shape(fingerprint, spacing)
  fixed = (data_choices(root, 3, rules.volume_normalisation(fingerprint))
           + [rules.cropping(fingerprint)]
           + [Choice("data.target_spacing", tuple(float(s) for s in spacing), spacing_rule),
              Choice("data.foreground_fraction", 1 / 3, "nnU-Net's foreground oversampling")]
           + rules.augmentation(budgeted=time_budget is not None))
  patch = tuple(int(p) for p in rules.initial_patch(spacing, shape))
  patch = rules.divisible(patch, rules.pooling(spacing, patch, rules.MAX_DEPTH[3]))
  trained = fixed + _optimizer(machine)
  while True:
    patch = _estimated_patch(patch, shape, spacing, trained, machine.budget, peak)
    network = rules.topology_3d(spacing, patch)
    limit = _limit(fingerprint, np.prod(patch), machine)
    batch, peaks = memory.largest_batch(machine.budget,
                                        _at(peak, config_of(trained + network)), limit)
    if batch >= MIN_DEVICE_BATCH:
      break
    smaller = rules.smaller_patch(patch, shape, spacing)
    if smaller == patch:
      raise ConfigError(f"{machine.budget_source}: not even the smallest 3D patch {patch} "
                        f"trains a batch of {MIN_DEVICE_BATCH} in it")
    patch = smaller
  patch = rules.choices_dict(network)["data.patch_size"]
  steps = 0
  if time_budget:
    shrunk = lambda p, share: _shrunk_patch(p, shape, spacing, share)
    network, steps = _fit_to_time(fixed, batch, machine, time_budget, patch, shrunk,
                                  lambda base, p: rules.topology_3d(spacing, p, base))
  return fixed + network + _batch_and_schedule(fingerprint, batch, peaks, int(np.prod(patch)),
                                               machine, steps)


def _shrunk_patch(patch, shape, spacing, share: float) -> tuple[int, ...]:
  """`patch` shrunk (as the memory fit shrinks it) to at most `share` of its voxels."""
  smaller = tuple(patch)
  while np.prod(smaller) > np.prod(patch) * share:
    shrunk = rules.smaller_patch(smaller, shape, spacing)
    if shrunk == smaller:
      break
    smaller = shrunk
  return smaller


def _fit_to_time(fixed: list[Choice], batch: int, machine: Machine, time_budget: TimeBudget,
                 example: tuple, shrink: Callable, network_of: Callable
                 ) -> tuple[list[Choice], int]:
  """The network a time budget trains (rules.candidates, rules.chosen), found by bisection:
  a step's time grows with capacity, so the candidates that take rules.MIN_STEPS are a
  prefix of the list, and about log2 of them are timed. When none takes them, the smallest
  width's example shrinks (`shrink(example, share)`) in proportion to the steps missing
  until one does or it shrinks no more. Its choices, with the timings in the width's rule,
  and steps."""
  def timed(base: int, shape: tuple) -> tuple:
    network = network_of(base, shape)
    seconds = time_budget.timer(config_of(fixed + network
                                          + rules.schedule(batch, machine.num_devices)))
    return network, base, shape, seconds, rules.budget_steps(time_budget.seconds, seconds)

  candidates = rules.candidates(example, lambda e: shrink(e, 0.5))
  found = {}
  low, high = 0, len(candidates) - 1    # the boundary lies in [low, high]
  while low <= high:
    middle = (low + high) // 2
    found[middle] = timed(*candidates[middle])
    if found[middle][-1] >= rules.MIN_STEPS:
      low = middle + 1
    else:
      high = middle - 1
  tried = _shrunk_to_min_steps([found[i] for i in sorted(found)], shrink, timed)
  network, *_, steps = tried[rules.chosen([t[-1] for t in tried])]
  timings = "; ".join(f"width {b} at {'x'.join(map(str, shape))}: {sec:.3g} s/step, {n} steps"
                      for _, b, shape, sec, n in tried)
  rule = (f"time budget {time_budget.seconds:g} s: the largest network (width x voxels) "
          f"that trains at least {rules.MIN_STEPS} steps in {rules.TRAIN_SHARE:.0%} of it "
          f"(when none does, the smallest width on an example shrunk in proportion to the "
          f"steps missing); timed here: {timings}")
  return [dataclasses.replace(c, rule=rule) if c.key == "model.base_features" else c
          for c in network], steps


def _shrunk_to_min_steps(tried: list[tuple], shrink: Callable, timed: Callable) -> list[tuple]:
  """`tried` (timed candidates, capacity ascending), and while none of them takes
  rules.MIN_STEPS, the smallest one's example shrunk by the share of the steps it takes
  and timed (`timed(base, shape)`) in front, until it shrinks no more."""
  while all(t[-1] < rules.MIN_STEPS for t in tried):
    _, base, shape, _, steps = tried[0]
    smaller = shrink(shape, steps / rules.MIN_STEPS)
    if smaller == tuple(shape):
      break
    tried = [timed(base, smaller), *tried]
  return tried


def _optimizer(machine: Machine) -> list[Choice]:
  """The planned optimizer and schedule, whose state and gradient clipping the memory fit
  measures with the network (the batch in them is not the one measured)."""
  return rules.schedule(MIN_DEVICE_BATCH, machine.num_devices)


def _limit(fingerprint: dict, example_voxels: int, machine: Machine) -> int:
  """The largest per-device batch worth measuring: the dataset's cap, or the least batch
  a plan needs."""
  return max(rules.batch_cap(fingerprint, int(example_voxels), machine.num_devices),
             MIN_DEVICE_BATCH)


def _at(peak: PeakFn, cfg: ml_collections.ConfigDict) -> Callable[[int], float]:
  return lambda batch: peak(cfg, batch)


def _estimated_patch(patch, shape, spacing, fixed, budget, peak) -> tuple[int, ...]:
  """`patch` (when a batch of MIN_DEVICE_BATCH fits `budget`) or `patch` shrunk until one
  does by a linear estimate: the compiled step of `patch` at batches 1 and MIN_DEVICE_BATCH
  gives fixed bytes and bytes per example voxel, which scale with the patch's voxels."""
  cfg = config_of(fixed + rules.topology_3d(spacing, patch))
  least = peak(cfg, MIN_DEVICE_BATCH)
  if least <= budget:
    return patch
  one = peak(cfg, 1)
  per_example = (least - one) / (MIN_DEVICE_BATCH - 1)
  per_voxel = per_example / np.prod(patch)
  constant = one - per_example
  while constant + MIN_DEVICE_BATCH * per_voxel * np.prod(patch) > budget:
    smaller = rules.smaller_patch(patch, shape, spacing)
    if smaller == patch:
      break
    patch = smaller
  return patch


def plan_2d(fingerprint: dict, root: str, machine: Machine, peak: PeakFn,
            time_budget: TimeBudget | None = None) -> list[Choice]:
  """The 2D plan: slice axis and size, network, batch, schedule; with a `time_budget`,
  the width and slice size that budget trains best, and its steps."""
  _, size, slicing = rules.slicing(fingerprint)
  fixed = data_choices(root, 2, rules.slice_normalisation(fingerprint)) + slicing
  while True:
    network = rules.topology_2d(size)
    image_size = rules.choices_dict(network)["data.image_size"]
    augment = rules.augmentation(image_size, budgeted=time_budget is not None)
    measured = config_of(fixed + _optimizer(machine) + network + augment)
    batch, peaks = memory.largest_batch(machine.budget, _at(peak, measured),
                                        _limit(fingerprint, image_size ** 2, machine))
    if batch >= MIN_DEVICE_BATCH:
      break
    if image_size <= 2 * rules.MIN_FEATURE_MAP:
      raise ConfigError(f"{machine.budget_source}: not even {image_size}x{image_size} slices "
                        f"train a batch of {MIN_DEVICE_BATCH} in it")
    size = int(image_size * 0.9)
  steps = 0
  if time_budget:
    shrunk = lambda size, share: (rules.choices_dict(rules.topology_2d(
        int(size[0] * share ** 0.5)))["data.image_size"],) * 2
    network, steps = _fit_to_time(fixed + augment, batch, machine, time_budget,
                                  (image_size, image_size), shrunk,
                                  lambda base, size: rules.topology_2d(size[0], base))
    augment = rules.augmentation(rules.choices_dict(network)["data.image_size"],
                                 budgeted=True)
  return (fixed + network + augment
          + _batch_and_schedule(fingerprint, batch, peaks, image_size ** 2, machine, steps))


def _batch_and_schedule(fingerprint: dict, fitted: int, peaks: dict[int, float],
                        example_voxels: int, machine: Machine, steps: int = 0
                        ) -> list[Choice]:
  """The per-device batch (what fits, capped by the dataset's size) and the schedule; the
  batch's rule gives the compiled steps' memory that decided it."""
  cap = rules.batch_cap(fingerprint, example_voxels, machine.num_devices)
  batch = min(fitted, cap)
  measured = sorted(peaks)
  gib = lambda b: (f"{peaks[b] / memory.GIB:.2f} GiB" if b in peaks else
                   f"{np.interp(b, measured, [peaks[m] for m in measured]) / memory.GIB:.2f}"
                   " GiB (interpolated)")
  fit = (f"XLA plans {gib(batch)} for a train step of batch {batch} (width "
         f"{rules.BASE_FEATURES}, the largest example), within "
         f"{machine.budget / memory.GIB:.2f} GiB ({machine.budget_source})")
  if batch == fitted and batch + 1 in peaks:
    fit += f"; batch {batch + 1}: {gib(batch + 1)}"
  else:  # the dataset's cap, not the budget, decided
    fit += (f"; {rules.DATASET_SHARE:.0%} of the dataset's voxels per global batch caps it "
            f"(at least {rules.MIN_GLOBAL_BATCH} over all devices)")
  return [dataclasses.replace(c, rule=fit) if c.key == "train.per_device_batch_size" else c
          for c in rules.schedule(batch, machine.num_devices, steps)]
