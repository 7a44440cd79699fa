"""Segmentation metrics from a confusion matrix, as defined in the source thesis.

n_ij = pixels of true class i predicted as j, t_i = sum_j n_ij, p_j = sum_i n_ij.
Per class: Dice 2n_ii/(t_i+p_i), accuracy n_ii/t_i, IoU n_ii/(t_i+p_i-n_ii).

Convention for undefined values: a class absent from both the ground truth and
the prediction has no Dice and no IoU (0/0), and a class absent from the ground
truth has no accuracy. These are reported as null and left out of the class
averages, instead of counting as a perfect 1 or a misleading 0. A class that is
predicted but absent from the ground truth has Dice and IoU 0.
"""

import numpy as np


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _nanmean(x: np.ndarray) -> float | None:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else None


def segmentation_metrics(confusion: np.ndarray) -> dict:
  """Dice, pixel accuracy, mean accuracy, mean IoU and frequency-weighted IoU."""
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
  }


def _none_if_nan(x: float) -> float | None:
  return None if np.isnan(x) else float(x)
