"""Evaluating a state on a split: exact metrics, per-volume metrics, CSV and a montage."""

import dataclasses
import os
from typing import Callable

import jax
import numpy as np
from absl import logging

from medseg_jax import files
from medseg_jax.parallel import multihost
from medseg_jax.data import loader
from medseg_jax.evaluation import metrics, overlay


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """The compiled eval step and what evaluating with it needs: built once per run."""

  eval_step: Callable      # (placed state, placed batch) -> (confusion, predicted labels)
  put_batch: Callable      # this process's part of a batch -> global arrays
  global_batch: int
  num_classes: int
  class_names: list[str]
  workdir: str             # results go to WORKDIR/eval/


def predict_split(ev: Evaluator, state, data: loader.SliceSet) -> tuple[np.ndarray, np.ndarray]:
  """(Confusion matrix summed over every device and host, predicted labels [N,H,W])."""
  global_batch = ev.global_batch
  confusion = np.zeros((ev.num_classes,) * 2, np.int64)
  preds = np.zeros(data.label.shape, np.uint8)
  batches = loader.eval_batches(data, global_batch, jax.process_index(), jax.process_count())
  for start, batch in zip(range(0, len(data), global_batch), batches):
    batch_confusion, batch_preds = ev.eval_step(state, ev.put_batch(batch))
    confusion += multihost.to_host(batch_confusion)
    count = min(global_batch, len(data) - start)
    preds[start:start + count] = multihost.gather(batch_preds)[:count]
  return confusion, preds


def per_volume_rows(data: loader.SliceSet, preds: np.ndarray, num_classes: int,
                    surface: bool) -> list[dict]:
  """3D Dice (and HD95 in mm if `surface`) per volume, over the slices evaluated."""
  rows = []
  for v, name in enumerate(data.names):
    members = data.volume == v
    rows.append(dict(volume=name, **metrics.volume_metrics(
        preds[members], data.label[members], data.spacing[v], num_classes, surface)))
  return rows


def evaluate(ev: Evaluator, state, data: loader.SliceSet, split: str, step: int,
             surface: bool = False, monitor=None) -> dict | None:
  """Metrics of `state` on `data` (the split named `split`), written to WORKDIR/eval/ (by
  process 0) and to the monitor's event files when one is given."""
  if not len(data):
    return None
  confusion, preds = predict_split(ev, state, data)
  rows = per_volume_rows(data, preds, ev.num_classes, surface)
  result = dict(metrics.segmentation_metrics(confusion), step=step, num_examples=len(data),
                per_volume=metrics.summarize_volumes(rows))
  if jax.process_index() == 0:
    out = os.path.join(ev.workdir, "eval")
    files.write_json(os.path.join(out, f"{split}_metrics.json"), result)
    files.write_csv(os.path.join(out, f"{split}_per_volume.csv"), rows)
    shown = overlay.pick_slices(data.label, data.volume)
    picture = overlay.write_montage(os.path.join(out, "montage", f"{split}_step{step:07d}.png"),
                                    data.image[shown], data.label[shown], preds[shown],
                                    ev.class_names, f"{split}, step {step}")
    if monitor is not None:
      monitor.evaluation(split, step, result, picture)
  logging.info("%s at step %d: dice %.4f, mean IoU %.4f, pixel accuracy %.4f", split, step,
               result["dice"] or 0.0, result["mean_iou"] or 0.0,
               result["pixel_accuracy"] or 0.0)
  return result

