"""Segmentation metrics: over a whole split from a confusion matrix, and per volume.

n_ij = pixels of true class i predicted as j, t_i = sum_j n_ij, p_j = sum_i n_ij.
Per class: Dice 2n_ii/(t_i+p_i), accuracy n_ii/t_i, IoU n_ii/(t_i+p_i-n_ii).

Convention for undefined values: a class absent from both the ground truth and
the prediction has no Dice and no IoU (0/0), and a class absent from the ground
truth has no accuracy. These are reported as null and left out of the class
averages, instead of counting as a perfect 1 or a misleading 0. A class that is
predicted but absent from the ground truth has Dice and IoU 0.

With regions (`data.regions`, label sets that may nest), each region is scored on the
membership of the true and predicted labels in it, from the same confusion matrix: its
Dice is 2|P∩T|/(|P|+|T|) over the voxels whose labels lie in the region. The headline
`dice` and `dice_foreground` are then the mean over the regions (what selects the best
checkpoint), `per_region` lists them, and `per_class` still describes the labels.

Per volume (what clinicians read), each foreground class gets a 3D Dice and the
95th-percentile Hausdorff distance in mm between the predicted and true surfaces.
The same convention holds: no Dice when the class is absent from both, no HD95
unless both contain the class (a distance to nothing is undefined); summaries
over volumes count only defined values and report how many there were.
"""

import numpy as np
from scipy import ndimage


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _nanmean(x: np.ndarray) -> float | None:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else None


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """[true, predicted] voxel counts of integer maps of one shape, as int64."""
  index = label.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray, regions: tuple = ()) -> dict:
  """Dice, pixel accuracy, mean accuracy, mean IoU and frequency-weighted IoU (and, with
  `regions`, each region's Dice and IoU, whose mean becomes the headline Dice)."""
  cm = np.asarray(confusion, np.float64)
  tp, truth, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
  dice = _ratio(2 * tp, truth + predicted)
  accuracy = _ratio(tp, truth)
  iou = _ratio(tp, truth + predicted - tp)
  total = truth.sum()
  per_class = [{"class": i, "dice": _none_if_nan(dice[i]), "accuracy": _none_if_nan(accuracy[i]),
                "iou": _none_if_nan(iou[i]), "support": int(truth[i])} for i in range(len(cm))]
  return {
      "dice": _nanmean(dice),
      "pixel_accuracy": float(tp.sum() / total) if total else None,
      "mean_accuracy": _nanmean(accuracy),
      "mean_iou": _nanmean(iou),
      "fw_iou": float(np.nansum(truth * iou) / total) if total else None,
      "dice_foreground": _nanmean(dice[1:]),
      "mean_accuracy_foreground": _nanmean(accuracy[1:]),
      "mean_iou_foreground": _nanmean(iou[1:]),
      "per_class": per_class,
      **(_regions_summary(cm, regions) if regions else {}),
  }


def _regions_summary(cm: np.ndarray, regions: tuple) -> dict:
  """Each region's Dice, IoU and support from the label confusion matrix `cm`, and their
  mean as `dice` and `dice_foreground`."""
  rows = []
  for r, region in enumerate(regions):
    inside = np.isin(np.arange(len(cm)), region)
    tp, truth, predicted = cm[np.ix_(inside, inside)].sum(), cm[inside].sum(), cm[:, inside].sum()
    both, union = truth + predicted, truth + predicted - tp
    rows.append({"region": r, "labels": list(region),
                 "dice": float(2 * tp / both) if both else None,
                 "iou": float(tp / union) if union else None, "support": int(truth)})
  mean = _nanmean(np.array([np.nan if row["dice"] is None else row["dice"] for row in rows]))
  return {"dice": mean, "dice_foreground": mean, "per_region": rows}


def _none_if_nan(x: float) -> float | None:
  return None if np.isnan(x) else float(x)


def _surface(mask: np.ndarray) -> np.ndarray:
  """Voxels of `mask` with a face-neighbour outside it (the array border counts as outside)."""
  return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1),
                                        border_value=0)


def hausdorff95(a: np.ndarray, b: np.ndarray, spacing) -> float | None:
  """95th-percentile symmetric surface distance in mm; None if either mask is empty."""
  if not a.any() or not b.any():
    return None
  surface_a, surface_b = _surface(a), _surface(b)
  to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
  to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
  return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def volume_metrics(pred: np.ndarray, label: np.ndarray, spacing, num_classes: int,
                   surface: bool = True, regions: tuple = ()) -> dict:
  """3D Dice (and HD95 if `surface`) of each foreground class in one volume [Z,Y,X]
  (`dice_1`, ...), and with `regions` of each region (`dice_region1`, ...).

  Dice is None for a class absent from both; HD95 is None unless both have the class.
  """
  sets = [(str(c), (c,)) for c in range(1, num_classes)]
  sets += [(f"region{r + 1}", tuple(region)) for r, region in enumerate(regions)]
  out = {}
  for name, labels in sets:
    a, b = np.isin(pred, labels), np.isin(label, labels)
    size = int(a.sum() + b.sum())
    out[f"dice_{name}"] = 2.0 * int((a & b).sum()) / size if size else None
    if surface:
      out[f"hd95_{name}"] = hausdorff95(a, b, spacing)
  return out


def summarize_volumes(rows: list[dict]) -> dict:
  """Mean, std and count over volumes of each per-volume metric, skipping None."""
  summary = {}
  for key in (k for k in (rows[0] if rows else {}) if k != "volume"):
    values = np.array([r[key] for r in rows if r[key] is not None], np.float64)
    summary[key] = {"mean": float(values.mean()) if values.size else None,
                    "std": float(values.std()) if values.size else None,
                    "count": int(values.size)}
  return summary
