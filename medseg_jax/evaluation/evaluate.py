"""Evaluating a state on a split: exact metrics, per-volume metrics, CSV and a montage.

How a split is predicted is the evaluator's `predict`, chosen once by the kind of data:
`predict_slices` sends a split of slices through the compiled eval step in global
batches; `predict_volumes` sends whole volumes (3D) volume by volume through
sliding-window inference, its windows spread over every device and host
(`Evaluator.window_run`), and sums the confusion matrix on the host from the whole
predicted volume, which every process holds alike."""

import dataclasses
import os
from typing import Callable

import jax
import numpy as np
from absl import logging

from medseg_jax import files
from medseg_jax.parallel import multihost
from medseg_jax.data import loader, targets, volume_loader
from medseg_jax.evaluation import metrics, overlay, sliding_window

MONTAGE_VOLUMES = 4  # the first volumes of a split shown in its montage


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """The compiled eval step and what evaluating with it needs: built once per run."""

  eval_step: Callable      # (placed state, placed batch) -> (confusion, predicted labels)
  put_batch: Callable      # this process's part of a batch -> global arrays
  global_batch: int
  outputs: targets.Classes | targets.Regions  # the network's outputs: classes or regions
  class_names: list[str]
  workdir: str             # results go to WORKDIR/eval/
  # (evaluator, placed state, split, surface) -> (confusion, per-volume rows, a function
  # returning the montage's (image, label, prediction) slices): `predict_slices` or
  # `predict_volumes`
  predict: Callable
  # 3D: the sliding-window settings, and (placed state) -> run(windows) -> probabilities
  windows: sliding_window.Windows | None = None
  window_run: Callable | None = None


def predict_split(ev: Evaluator, state, data: loader.SliceSet) -> tuple[np.ndarray, np.ndarray]:
  """(Confusion matrix summed over every device and host, predicted labels [N,H,W])."""
  global_batch = ev.global_batch
  confusion = np.zeros((ev.outputs.num_labels,) * 2, np.int64)
  preds = np.zeros(data.label.shape, np.uint8)
  batches = loader.eval_batches(data, global_batch, jax.process_index(), jax.process_count())
  for start, batch in zip(range(0, len(data), global_batch), batches):
    batch_confusion, batch_preds = ev.eval_step(state, ev.put_batch(batch))
    confusion += multihost.to_host(batch_confusion)
    count = min(global_batch, len(data) - start)
    preds[start:start + count] = multihost.gather(batch_preds)[:count]
  return confusion, preds


def predict_slices(ev: Evaluator, state, data: loader.SliceSet, surface: bool
                   ) -> tuple[np.ndarray, list[dict], Callable[[], list[tuple]]]:
  """`Evaluator.predict` of slices: the confusion matrix, per-volume rows, and the
  montage's slices (read from the split only when asked for, by process 0)."""
  confusion, preds = predict_split(ev, state, data)
  rows = per_volume_rows(data, preds, ev.outputs, surface)

  def shown() -> list[tuple]:
    picked = overlay.pick_slices(data.label, data.volume)
    return list(zip(data.image[picked], data.label[picked], preds[picked]))

  return confusion, rows, shown


def per_volume_rows(data: loader.SliceSet, preds: np.ndarray,
                    outputs: targets.Classes | targets.Regions, surface: bool) -> list[dict]:
  """3D Dice (and HD95 in mm if `surface`) per volume, over the slices evaluated."""
  rows = []
  for v, name in enumerate(data.names):
    members = data.volume == v
    rows.append(dict(volume=name, **metrics.volume_metrics(
        preds[members], data.label[members], data.spacing[v], outputs.num_labels, surface,
        outputs.regions)))
  return rows


def predict_volumes(ev: Evaluator, state, data: volume_loader.VolumeSet, surface: bool
                    ) -> tuple[np.ndarray, list[dict], Callable[[], list[tuple]]]:
  """`Evaluator.predict` of whole volumes by sliding windows: the confusion matrix over
  every voxel, per-volume rows, and the montage's (image, label, prediction) slices of
  the first volumes."""
  run = ev.window_run(state)
  n = ev.outputs.num_labels
  confusion = np.zeros((n, n), np.int64)
  rows, shown = [], []
  for v, name in enumerate(data.names):
    image, label = data.volume(v)
    pred = ev.outputs.labels(ev.windows.apply(image, run)).astype(np.uint8)
    confusion += metrics.confusion_matrix(label, pred, n)
    rows.append(dict(volume=name, **metrics.volume_metrics(
        pred, label, data.spacing[v], n, surface, ev.outputs.regions)))
    if v < MONTAGE_VOLUMES:
      shown.append(_axial_slice(image, label, pred))
  return confusion, rows, lambda: shown


def _axial_slice(image: np.ndarray, label: np.ndarray, pred: np.ndarray) -> tuple:
  """The slice across the last (RAS: S) axis with the most foreground (else the middle)."""
  axial = lambda x: np.moveaxis(x, 2, 0)
  row = overlay.pick_slices(axial(label), np.zeros(label.shape[2], np.int64), 1)[0]
  return axial(image)[row], axial(label)[row], axial(pred)[row]


def _montage_rows(shown: list[tuple]) -> list[np.ndarray]:
  """Images, labels and predictions of `shown` slices stacked, each padded with zeros to
  the largest (volumes differ in size)."""
  size = np.max([s[1].shape for s in shown], axis=0)
  def padded(x):
    return np.pad(x, [(0, n - m) for n, m in zip(size, x.shape[:2])] + [(0, 0)] * (x.ndim - 2))
  return [np.stack([padded(s[i]) for s in shown]) for i in range(3)]


def evaluate(ev: Evaluator, state, data: loader.SliceSet | volume_loader.VolumeSet,
             split: str, step: int, surface: bool = False, monitor=None) -> dict | None:
  """Metrics of `state` on `data` (the split named `split`), written to WORKDIR/eval/ (by
  process 0) and to the monitor's event files when one is given."""
  if not len(data):
    return None
  confusion, rows, shown = ev.predict(ev, state, data, surface)
  result = dict(metrics.segmentation_metrics(confusion, ev.outputs.regions), step=step,
                num_examples=len(data),
                per_volume=metrics.summarize_volumes(rows))
  if jax.process_index() == 0:
    out = os.path.join(ev.workdir, "eval")
    files.write_json(os.path.join(out, f"{split}_metrics.json"), result)
    files.write_csv(os.path.join(out, f"{split}_per_volume.csv"), rows)
    picture = overlay.write_montage(os.path.join(out, "montage", f"{split}_step{step:07d}.png"),
                                    *_montage_rows(list(shown())), ev.class_names,
                                    f"{split}, step {step}")
    if monitor is not None:
      monitor.evaluation(split, step, result, picture)
  logging.info("%s at step %d: dice %.4f, mean IoU %.4f, pixel accuracy %.4f", split, step,
               result["dice"] or 0.0, result["mean_iou"] or 0.0,
               result["pixel_accuracy"] or 0.0)
  return result

