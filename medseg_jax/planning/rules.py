"""The rules that turn a fingerprint into a plan's values, without compiling anything:
each `Choice` holds a config key, its value and the rule behind it in words, which the
written plan keeps on the line above the value.

docs/new_dataset.md states every rule; nnU-Net's (Isensee et al., Nature Methods 2021)
are named where they are its.
"""

import dataclasses
import math

import numpy as np

from medseg_jax.data import preprocess

ANISOTROPY = 3.0         # an axis this much coarser than the others (nnU-Net's threshold)
COARSE_PERCENTILE = 10   # an anisotropic axis's target: this percentile of its spacings
PATCH_VOXELS = 256 ** 3  # the 3D patch a plan starts from, before the memory fit shrinks it
MIN_FEATURE_MAP = 4      # voxels along a pooled axis at the bottleneck, at least
MAX_DEPTH = {2: 5, 3: 5}  # pooling levels (the 2D U-Net's widths are not capped)
BASE_FEATURES = 32
MAX_FEATURES_3D = 320
DATASET_SHARE = 0.05     # a global batch holds at most this share of the dataset's voxels
MIN_GLOBAL_BATCH = 2
NONZERO_MASK_SHARE = 0.75  # z-score over the non-zero voxels where the box holds less
EPOCHS = 1000            # without a time budget: nnU-Net's 1000 epochs ...
STEPS_PER_EPOCH = 250    # ... of 250 one-device steps
VALIDATIONS = 20         # validations (and checkpoints) over a run
# A time budget: its share for train steps (the rest: start-up, compiles, validations,
# checkpoints), the widths tried, and the least steps a network is given to learn (on the
# synthetic MRI set the 3D quickstart's validation Dice still gains 0.04 from step 500 to
# 1000: BENCHMARKS.md, "Planned runs against the hand-set 3D quickstart").
TRAIN_SHARE = 0.8
BUDGET_WIDTHS = (8, 16, 32)
MIN_STEPS = 1000
BUDGET_EPOCHS = 50
BUDGET_VALIDATIONS = 5


@dataclasses.dataclass(frozen=True)
class Choice:
  key: str     # a config key, e.g. "data.patch_size"
  value: object
  rule: str    # why this value, in words


def choices_dict(choices: list[Choice]) -> dict:
  """key -> value of `choices`."""
  return {c.key: c.value for c in choices}


def target_spacing(fingerprint: dict) -> tuple[np.ndarray, str]:
  """The median spacing per axis; for an anisotropic dataset (one axis over ANISOTROPY
  times coarser than the others and holding ANISOTROPY times fewer voxels), that axis's
  10th percentile instead, kept above the other axes' spacing (nnU-Net's rule)."""
  spacings = np.array([c["spacing"] for c in fingerprint["cases"]], dtype=np.float64)
  target = np.median(spacings, axis=0)
  sizes = median_shape(fingerprint, target)
  coarse = int(np.argmax(target))
  others = [a for a in range(3) if a != coarse]
  rule = f"the median spacing of the {len(spacings)} training cases"
  if (target[coarse] > ANISOTROPY * target[others].max()
      and sizes[coarse] * ANISOTROPY < sizes[others].min()):
    fine = float(np.percentile(spacings[:, coarse], COARSE_PERCENTILE))
    target[coarse] = max(fine, target[others].max() + 1e-5)
    rule += (f"; axis {coarse} is anisotropic (over {ANISOTROPY:g}x coarser, "
             f"{ANISOTROPY:g}x fewer voxels): the {COARSE_PERCENTILE}th percentile of its "
             "spacings")
  return np.round(target, 5), rule


def median_shape(fingerprint: dict, spacing) -> np.ndarray:
  """The median over cases of each case's non-zero box resampled to `spacing`."""
  shapes = [np.array(c["cropped_shape"]) * np.array(c["spacing"]) / np.asarray(spacing)
            for c in fingerprint["cases"]]
  return np.round(np.median(shapes, axis=0)).astype(int)


def cropped_share(fingerprint: dict) -> float:
  """The median over the cases of the share of its voxels its non-zero box holds."""
  return float(np.median([np.prod(c["cropped_shape"]) / np.prod(c["shape"])
                          for c in fingerprint["cases"]]))


def cropping(fingerprint: dict) -> Choice:
  return Choice("data.crop_to_nonzero", True,
                f"nnU-Net crops every case to its non-zero box (here a median "
                f"{cropped_share(fingerprint):.0%} of its voxels)")


def slice_normalisation(fingerprint: dict) -> Choice:
  """2D slices have no dataset-wide scheme: CT clipped to each volume's percentiles, other
  modalities z-scored per volume over its non-zero voxels."""
  if any(_ct_channels(fingerprint)):
    return Choice("data.normalisation", "percentile", "CT: clipped to each volume's "
                  "0.5-99.5 percentiles, rescaled to [0, 1]")
  return Choice("data.normalisation", "zscore_nonzero", "no channel is CT: z-score each "
                "volume over its non-zero voxels")


def volume_normalisation(fingerprint: dict) -> Choice:
  """CT channels clipped to the training foreground's 0.5-99.5 percentiles and z-scored
  with its mean and std; every other modality z-scored per volume, over its non-zero
  voxels where cropping to them shrinks a case (its median share under
  NONZERO_MASK_SHARE, nnU-Net's rule), else over the whole volume."""
  ct = _ct_channels(fingerprint)
  share = cropped_share(fingerprint)
  if all(ct):
    value = "ct"
  elif any(ct):
    value = "auto"
  else:
    value = "mri" if share < NONZERO_MASK_SHARE else "zscore"
  box = f"a case's non-zero box holds a median {share:.0%} of its voxels"
  words = {"ct": "every channel is CT: clip to the training foreground's 0.5-99.5 "
                 "percentiles, z-score with its mean and std",
           "mri": f"no channel is CT: z-score each volume over its non-zero voxels ({box}, "
                  f"under {NONZERO_MASK_SHARE:.0%})",
           "zscore": f"no channel is CT: z-score each volume over all its voxels ({box}, not "
                     f"under {NONZERO_MASK_SHARE:.0%})",
           "auto": "CT channels as CT (clip, dataset z-score), the others z-scored per volume "
                   "over their non-zero voxels"}
  return Choice("data.volume_normalisation", value, words[value])


def _ct_channels(fingerprint: dict) -> list[bool]:
  """Which channels are CT, by the rule the volume store normalises them by."""
  return [s == "ct" for s in preprocess.channel_schemes(tuple(fingerprint["modalities"]))]


def pooling(spacing, patch, max_depth: int) -> list[tuple[int, ...]]:
  """Each level's pooling factors: an axis is pooled while its spacing at that level is
  under twice the finest one's and it keeps MIN_FEATURE_MAP voxels after pooling; no
  level pools nothing (nnU-Net's rule, with its minimal feature map)."""
  spacing, size = np.array(spacing, dtype=np.float64), np.array(patch, dtype=np.float64)
  levels = []
  while len(levels) < max_depth:
    pooled = (spacing < 2 * spacing.min()) & (size / 2 >= MIN_FEATURE_MAP)
    if not pooled.any():
      break
    factors = np.where(pooled, 2, 1)
    levels.append(tuple(int(f) for f in factors))
    spacing, size = spacing * factors, size / factors
  return levels


def divisible(patch, levels) -> tuple[int, ...]:
  """`patch` rounded down to the nearest multiple of each axis's total pooling factor."""
  totals = [math.prod(axis) for axis in zip(*levels)] if levels else [1] * len(patch)
  return tuple(max(t, int(p) // t * t) for p, t in zip(patch, totals))


def initial_patch(spacing, shape) -> np.ndarray:
  """A patch of PATCH_VOXELS voxels shaped as a cube in millimetres, no larger than the
  median shape along any axis (nnU-Net's starting point)."""
  inverse = 1 / np.asarray(spacing, dtype=np.float64)
  patch = inverse * (PATCH_VOXELS / np.prod(inverse)) ** (1 / 3)
  return np.minimum(np.round(patch), shape).astype(int)


def shrink(patch, shape, levels) -> tuple[int, ...]:
  """`patch` made smaller along the axis where it is largest relative to the median
  `shape`, by that axis's total pooling factor (nnU-Net's step)."""
  totals = [math.prod(axis) for axis in zip(*levels)] if levels else [1, 1, 1]
  ratios = np.asarray(patch) / np.asarray(shape)
  for axis in np.argsort(-ratios, kind="stable"):
    if patch[axis] > totals[axis]:
      smaller = list(patch)
      smaller[axis] -= totals[axis]
      return tuple(smaller)
  return tuple(patch)


def smaller_patch(patch, shape, spacing) -> tuple[int, ...]:
  """One `shrink` step of a 3D patch, rounded down to a multiple of the smaller patch's own
  pooling (`divisible`): the patch its network would train on."""
  shrunk = shrink(patch, shape, pooling(spacing, patch, MAX_DEPTH[3]))
  return divisible(shrunk, pooling(spacing, shrunk, MAX_DEPTH[3]))


def topology_3d(spacing, patch, base: int = BASE_FEATURES) -> list[Choice]:
  """The 3D U-Net of `patch`: its pooling, depth and widths (`base` at the first level)."""
  levels = pooling(spacing, patch, MAX_DEPTH[3])
  return [
      Choice("model.name", "unet3d", "the 3D U-Net"),
      Choice("data.patch_size", divisible(patch, levels),
             "from the median shape at the target spacing, shrunk (largest axis relative "
             "to the median shape first) until a batch of 2 fits the memory budget"),
      Choice("model.depth", len(levels), f"levels pooled until an axis would fall under "
             f"{MIN_FEATURE_MAP} voxels (at most {MAX_DEPTH[3]})"),
      Choice("model.pooling", tuple(levels), "an axis is pooled while its spacing is under "
             "twice the finest axis's (so a coarse axis waits)"),
      Choice("model.base_features", base, "nnU-Net's first-level width"),
      Choice("model.max_features", MAX_FEATURES_3D, "nnU-Net's cap on a 3D level's width"),
      Choice("model.norm", "instance", "per-example statistics, as nnU-Net's"),
  ]


def topology_2d(size: int, base: int = BASE_FEATURES) -> list[Choice]:
  """The 2D U-Net of `size` x `size` slices (`base` channels at the first level)."""
  depth = 0
  while depth < MAX_DEPTH[2] and size / 2 ** (depth + 1) >= MIN_FEATURE_MAP:
    depth += 1
  factor = 2 ** depth
  return [
      Choice("model.name", "unet", "the 2D U-Net"),
      Choice("data.image_size", max(factor, size // factor * factor),
             "the larger median in-plane size at the median spacing, a multiple of "
             "2**depth"),
      Choice("model.depth", depth, f"levels pooled until a side would fall under "
             f"{MIN_FEATURE_MAP} pixels (at most {MAX_DEPTH[2]})"),
      Choice("model.base_features", base, "nnU-Net's first-level width"),
      Choice("model.norm", "group", "per-example statistics, independent of the batch"),
  ]


def slicing(fingerprint: dict) -> tuple[int, int, list[Choice]]:
  """The 2D slice axis (the coarsest, or the last when none is coarser) and in-plane size."""
  spacing, rule = target_spacing(fingerprint)
  axis = int(np.argmax(spacing)) if spacing.max() > spacing.min() else 2
  shape = median_shape(fingerprint, spacing)
  size = int(max(s for a, s in enumerate(shape) if a != axis))
  return axis, size, [
      Choice("data.slice_axis", axis, "slices across the coarsest axis (the last when all "
             "are equal), so each slice keeps the finest spacing"),
      Choice("data.slice_selection", "all", "every slice of every training volume"),
      Choice("data.slices_per_volume", 0, "every slice")]


def batch_cap(fingerprint: dict, example_voxels: int, num_devices: int) -> int:
  """The per-device batch at which a global batch holds DATASET_SHARE of the dataset's
  voxels (at the target spacing), at least one example per device and MIN_GLOBAL_BATCH
  over all devices."""
  spacing, _ = target_spacing(fingerprint)
  dataset = float(np.prod(median_shape(fingerprint, spacing))) * len(fingerprint["cases"])
  cap = int(DATASET_SHARE * dataset / example_voxels) // num_devices
  return max(cap, 1, -(-MIN_GLOBAL_BATCH // num_devices))


def schedule(per_device_batch: int, num_devices: int, budget_steps: int = 0) -> list[Choice]:
  """Optimizer, learning-rate policy and lengths for `num_devices` devices. Without a
  budget an epoch is STEPS_PER_EPOCH one-device steps' examples on any device count, so N
  devices take N times fewer steps; with one, `budget_steps` steps make BUDGET_EPOCHS
  epochs. One device trains with nnU-Net's SGD and poly decay, N > 1 with GreScale's
  warm-up to N x the LR, stabilisation and decay (lr.policy="grescale")."""
  global_batch = per_device_batch * num_devices
  return (_optimizer(per_device_batch) + _lengths(per_device_batch, global_batch, budget_steps)
          + _policy(per_device_batch, num_devices))


def _optimizer(per_device_batch: int) -> list[Choice]:
  return [
      Choice("optim.name", "sgd", "nnU-Net's optimizer: SGD, Nesterov momentum 0.99"),
      Choice("optim.momentum", 0.99, "nnU-Net's"),
      Choice("optim.nesterov", True, "nnU-Net's"),
      Choice("optim.lr", 0.01, "nnU-Net's initial LR, for one device's batch"),
      Choice("optim.weight_decay", 3e-5, "nnU-Net's"),
      Choice("optim.grad_clip_norm", 12.0, "nnU-Net clips the gradient norm at 12"),
      Choice("lr.reference_batch_size", per_device_batch, "the LR above is one device's"),
      Choice("train.per_device_batch_size", per_device_batch, "the largest batch the "
             "memory budget holds, capped at 5% of the dataset's voxels per global batch")]


def _lengths(per_device_batch: int, global_batch: int, budget_steps: int) -> list[Choice]:
  """Epoch length, epochs, steps and the validation period."""
  if budget_steps:
    samples = -(-budget_steps * global_batch // BUDGET_EPOCHS)
    out = [Choice("data.augment.samples_per_epoch", samples,
                  f"an epoch: a {BUDGET_EPOCHS}th of the steps the time budget holds"),
           Choice("train.num_epochs", BUDGET_EPOCHS, "the epochs warm-up and decay count"),
           Choice("train.num_steps", budget_steps, "the steps the time budget holds")]
    validations, steps = BUDGET_VALIDATIONS, budget_steps
  else:
    samples = STEPS_PER_EPOCH * per_device_batch
    out = [Choice("data.augment.samples_per_epoch", samples, f"an epoch: {STEPS_PER_EPOCH} "
                  "steps of one device's batch, on any device count"),
           Choice("train.num_epochs", EPOCHS, f"nnU-Net's {EPOCHS} epochs")]
    validations, steps = VALIDATIONS, -(-EPOCHS * samples // global_batch)
  # Rounded up: no periodic validation falls a few steps before the final one.
  every = max(1, -(-steps // validations))
  return out + [Choice("train.eval_every_steps", every, f"{validations} validations per run"),
                Choice("checkpoint.every_steps", every, "with every validation")]


def _policy(per_device_batch: int, num_devices: int) -> list[Choice]:
  if num_devices == 1:
    return [Choice("lr.policy", "standard", "one device: nnU-Net's schedule"),
            Choice("lr.scaling", "none", "one device: nothing to scale"),
            Choice("lr.decay", "poly", "(1 - t/T)^0.9, nnU-Net's")]
  return [Choice("lr.policy", "grescale", f"{num_devices} devices: GreScale, warm-up to "
                 f"{num_devices} x the LR, held at lr.grescale.stabilisation_factor of it, "
                 "then decayed (docs/large_batches.md)"),
          Choice("lr.scaling", "linear", f"k = global batch {per_device_batch * num_devices}"
                 f" / reference {per_device_batch} = {num_devices}")]


def budget_steps(budget_seconds: float, step_seconds: float) -> int:
  """The train steps TRAIN_SHARE of a time budget holds at `step_seconds` each."""
  return int(TRAIN_SHARE * budget_seconds // step_seconds)


def candidates(example, shrink_to_half) -> list[tuple[int, tuple]]:
  """(base width, example shape) pairs a time budget chooses from, by capacity (width x
  voxels) ascending: every width of BUDGET_WIDTHS at the memory-fitted example and at one
  of about half its voxels (`shrink_to_half`)."""
  half = shrink_to_half(tuple(example))
  shapes = [tuple(example)] if half == tuple(example) else [half, tuple(example)]
  pairs = [(w, shape) for shape in shapes for w in BUDGET_WIDTHS]
  return sorted(pairs, key=lambda p: (p[0] * math.prod(p[1]), p[0]))


def chosen(steps: list[int]) -> int:
  """The index of the candidate (capacity ascending) a budget trains: the largest that
  still takes MIN_STEPS steps, or the smallest when none does."""
  fit = [i for i, n in enumerate(steps) if n >= MIN_STEPS]
  return fit[-1] if fit else 0


def augmentation(image_size: int = 0, budgeted: bool = False) -> list[Choice]:
  """nnU-Net's spatial and intensity ranges, on device; 2D slices of `image_size` are
  also shifted by up to a tenth of their side (3D patches are drawn at random places).
  Off in a `budgeted` run: the ranges are written, for a longer run to switch on."""
  shift = round(image_size / 10, 1)
  enabled = (Choice("data.augment.enabled", False, "a time budget's run is short: off (on "
                    "the synthetic MRI set a 10-minute 3D plan's validation Dice was 0.01-0.10 "
                    "higher without it at every validation of 2 seeds, BENCHMARKS.md); "
                    "nnU-Net's ranges below are for 1000 epochs")
             if budgeted else Choice("data.augment.enabled", True, "nnU-Net augments every "
                                     "task"))
  return [
      enabled,
      Choice("data.augment.rotation_degrees", 30.0, "nnU-Net's +-30 degrees"),
      Choice("data.augment.zoom", (0.7, 1.4), "nnU-Net's scaling range"),
      Choice("data.augment.translate_pixels", shift, "a tenth of the slice's side"
             if image_size else "unused in 3D: patches are drawn at random places"),
      Choice("data.augment.flip_probability", 0.5, "nnU-Net mirrors along every axis"),
      Choice("data.augment.intensity_scale", 0.25, "nnU-Net's brightness in [0.75, 1.25]"),
  ]
