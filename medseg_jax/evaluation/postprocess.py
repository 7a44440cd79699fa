"""Post-processing of a label map: keep the largest connected component of the foreground
(all foreground classes together), then of chosen classes, as nnU-Net does where
cross-validation shows it helps (`tuning.crossval` decides; `evaluation.largest_component_*`
holds the decision; prediction applies it).

Components are 26-connected in 3D (voxels touching at a face, an edge or a corner);
ties in size keep the first component in voxel order.
"""

import dataclasses

import ml_collections
import numpy as np
from scipy import ndimage

from medseg_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Postprocessing:
  """What is kept of a label map: the largest foreground component (`foreground`), then
  the largest component of each class in `classes`; the rest becomes background."""

  foreground: bool = False
  classes: tuple[int, ...] = ()

  def __call__(self, labels: np.ndarray) -> np.ndarray:
    return apply(labels, self.foreground, self.classes)

  @property
  def active(self) -> bool:
    return self.foreground or bool(self.classes)


def from_config(evaluation: ml_collections.ConfigDict) -> Postprocessing:
  """The post-processing `evaluation.largest_component_*` asks for, checked."""
  classes = tuple(evaluation.largest_component_classes)
  if not all(isinstance(c, int) and c >= 1 for c in classes):
    raise ConfigError(f"evaluation.largest_component_classes={classes}: foreground class "
                      "numbers (1, 2, ...)")
  return Postprocessing(foreground=bool(evaluation.largest_component_foreground),
                        classes=classes)


def largest_component(mask: np.ndarray) -> np.ndarray:
  """The largest 26-connected component of a boolean mask (all False when it is empty)."""
  components, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
  if count <= 1:
    return mask.astype(bool)
  sizes = np.bincount(components.ravel())[1:]
  return components == 1 + int(np.argmax(sizes))


def apply(labels: np.ndarray, foreground: bool, classes: tuple[int, ...]) -> np.ndarray:
  """`labels` with what lies outside the kept components set to background (0)."""
  out = np.array(labels, copy=True)
  if foreground:
    out[~largest_component(out > 0)] = 0
  for c in classes:
    mask = out == c
    out[mask & ~largest_component(mask)] = 0
  return out


def dice_per_class(pred: np.ndarray, truth: np.ndarray, num_classes: int,
                   regions: tuple = ()) -> np.ndarray:
  """Dice of each foreground class 1..K-1 of one case (with `regions`, of each region: the
  voxels whose labels lie in it); NaN where both are empty."""
  scores = []
  for labels in regions or [(c,) for c in range(1, num_classes)]:
    p, t = np.isin(pred, labels), np.isin(truth, labels)
    total = p.sum() + t.sum()
    scores.append(2.0 * np.logical_and(p, t).sum() / total if total else np.nan)
  return np.array(scores)


def class_dice(cases: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
               regions: tuple = ()) -> np.ndarray:
  """The Dice of each foreground class (or region) over (prediction, truth) pairs: per
  class, the mean over the cases where the class is in the prediction or the truth."""
  return np.nanmean([dice_per_class(p, t, num_classes, regions) for p, t in cases], axis=0)


def decide(cases: list[tuple[np.ndarray, np.ndarray]], num_classes: int,
           regions: tuple = ()) -> dict:
  """nnU-Net's rule on (prediction, truth) pairs: keep the largest foreground component if
  that raises the mean foreground Dice over the cases; then, on top, the largest component
  of each class whose own Dice that raises. With `regions` the Dice is the regions' and
  only the foreground is decided (a class's component is not a region's). Returns the
  decision and the Dice behind it."""
  def mean_dice(post: Postprocessing) -> np.ndarray:  # per class, mean over the cases
    return class_dice([(post(p), t) for p, t in cases], num_classes, regions)
  none = mean_dice(Postprocessing())
  chosen = Postprocessing(foreground=True)
  with_foreground = mean_dice(chosen)
  if not np.nanmean(with_foreground) > np.nanmean(none):
    chosen, with_foreground = Postprocessing(), none
  current = with_foreground
  for c in range(1, 1 if regions else num_classes):
    trial = dataclasses.replace(chosen, classes=chosen.classes + (c,))
    dice = mean_dice(trial)
    if dice[c - 1] > current[c - 1]:
      chosen, current = trial, dice
  return {"foreground": chosen.foreground, "classes": list(chosen.classes),
          "dice_per_class": {"none": none.tolist(), "foreground": with_foreground.tolist(),
                             "chosen": current.tolist()},
          "mean_dice": {"none": float(np.nanmean(none)), "chosen": float(np.nanmean(current))}}
