"""Metrics from a hand-built confusion matrix; the on-device matrix over 8 devices."""

import functools

import jax
import numpy as np
import pytest

import helpers
from medseg_jax.evaluation import metrics
from medseg_jax.data import targets
from medseg_jax.parallel import multihost, strategies
from medseg_jax.models import UNet
from medseg_jax.training import step
from medseg_jax.training.state import TrainState
import optax

# Hand-built: rows = truth, columns = prediction.
CM = np.array([[50, 2, 3],
               [4, 20, 1],
               [0, 5, 15]])


def test_thesis_formulas_on_a_hand_built_matrix():
  m = metrics.segmentation_metrics(CM)
  # Worked by hand: t = (55, 25, 20), p = (54, 27, 19), n_ii = (50, 20, 15), total 100.
  dice = [100 / 109, 40 / 52, 30 / 39]
  acc = [50 / 55, 20 / 25, 15 / 20]
  iou = [50 / 59, 20 / 32, 15 / 24]
  assert m["dice"] == pytest.approx(np.mean(dice))
  assert m["pixel_accuracy"] == pytest.approx(85 / 100)
  assert m["mean_accuracy"] == pytest.approx(np.mean(acc))
  assert m["mean_iou"] == pytest.approx(np.mean(iou))
  assert m["fw_iou"] == pytest.approx((55 * iou[0] + 25 * iou[1] + 20 * iou[2]) / 100)
  assert m["dice_foreground"] == pytest.approx(np.mean(dice[1:]))
  assert [c["support"] for c in m["per_class"]] == [55, 25, 20]


def test_absent_class_is_null_and_left_out_of_averages():
  cm = np.array([[90, 0, 0], [0, 10, 0], [0, 0, 0]])  # class 2 neither present nor predicted
  m = metrics.segmentation_metrics(cm)
  assert m["per_class"][2]["dice"] is None and m["per_class"][2]["iou"] is None
  assert m["dice"] == pytest.approx(1.0) and m["mean_iou"] == pytest.approx(1.0)
  false_positive = np.array([[90, 0, 5], [0, 5, 0], [0, 0, 0]])  # predicted, never true
  m = metrics.segmentation_metrics(false_positive)
  assert m["per_class"][2]["dice"] == 0.0 and m["per_class"][2]["accuracy"] is None


def _tiny_state(seed):
  model = UNet(num_classes=3, depth=2, base_features=4)
  variables = helpers.init_variables(model, np.zeros((1, 32, 32, 1), np.float32), seed)
  return model, variables, TrainState.create(apply_fn=model.apply, params=variables["params"],
                                             model_state={}, tx=optax.sgd(0.1))


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_confusion_matrix_over_8_devices_matches_numpy(devices8, strategy):
  """Eval on 8 shards with a padded batch equals a confusion matrix counted in numpy."""
  model, variables, state = _tiny_state(0)
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 1)).astype(np.float32),
           "label": rng.integers(0, 3, (16, 32, 32)).astype(np.int32),
           "mask": np.arange(16) < 11}  # the last 5 rows are padding
  pred = np.argmax(np.asarray(jax.jit(model.apply)(variables, batch["image"])), -1)
  expected = np.zeros((3, 3), np.int64)
  np.add.at(expected, (batch["label"][:11].ravel(), pred[:11].ravel()), 1)
  par = strategies.make_parallel(strategy, 8)
  eval_fn = par.eval_step(functools.partial(step.eval_step, outputs=targets.Classes(3)))
  confusion, labels = eval_fn(par.put_state(state), par.put_batch(batch))
  np.testing.assert_array_equal(multihost.to_host(confusion), expected)
  np.testing.assert_array_equal(multihost.gather(labels)[:11], pred[:11])


@pytest.mark.parametrize("num_classes", [2, 4])
def test_metrics_match_mask_formulas_on_random_label_maps(num_classes):
  """Binary and multi-class: confusion-matrix metrics equal set formulas on the masks."""
  rng = np.random.default_rng(num_classes)
  truth = rng.integers(0, num_classes, (6, 20, 20))
  pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, num_classes, truth.shape))
  cm = np.zeros((num_classes, num_classes), np.int64)
  for t, p in zip(truth.ravel(), pred.ravel()):
    cm[t, p] += 1
  m = metrics.segmentation_metrics(cm)
  dice, iou, acc = [], [], []
  for c in range(num_classes):
    a, b = pred == c, truth == c
    dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    iou.append((a & b).sum() / (a | b).sum())
    acc.append((a & b).sum() / b.sum())
  assert m["dice"] == pytest.approx(np.mean(dice))
  assert m["mean_iou"] == pytest.approx(np.mean(iou))
  assert m["mean_accuracy"] == pytest.approx(np.mean(acc))
  assert m["pixel_accuracy"] == pytest.approx(np.mean(pred == truth))
  weights = [np.mean(truth == c) for c in range(num_classes)]
  assert m["fw_iou"] == pytest.approx(np.dot(weights, iou))


def test_hausdorff_between_parallel_planes_is_their_distance_in_mm():
  a = np.zeros((20, 12, 12), bool)
  b = np.zeros_like(a)
  a[6], b[10] = True, True  # 4 slices apart, slices 2.5 mm apart
  assert metrics.hausdorff95(a, b, (2.5, 0.7, 0.7)) == pytest.approx(10.0)


def test_hausdorff_between_concentric_spheres_is_the_radius_gap():
  grid = np.mgrid[:48, :48, :48] - 23.5
  r = np.sqrt((grid ** 2).sum(0))
  inner, outer = r < 10, r < 16
  assert metrics.hausdorff95(inner, outer, (1.0, 1.0, 1.0)) == pytest.approx(6.0, abs=1.0)
  assert metrics.hausdorff95(inner, np.zeros_like(inner), (1, 1, 1)) is None


def test_volume_metrics_follow_the_empty_class_convention():
  label = np.zeros((4, 8, 8), np.int64)
  label[1:3, 2:6, 2:6] = 1
  pred = label.copy()
  rows = [dict(volume="v", **metrics.volume_metrics(pred, label, (1, 1, 1), 3))]
  assert rows[0]["dice_1"] == 1.0 and rows[0]["hd95_1"] == 0.0
  assert rows[0]["dice_2"] is None and rows[0]["hd95_2"] is None  # class 2 nowhere
  summary = metrics.summarize_volumes(rows)
  assert summary["dice_2"] == {"mean": None, "std": None, "count": 0}
  assert summary["dice_1"]["count"] == 1


def test_eight_device_evaluation_equals_one_device(devices8):
  _, _, state = _tiny_state(2)
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(16, 32, 32, 1)).astype(np.float32),
           "label": rng.integers(0, 3, (16, 32, 32)).astype(np.int32),
           "mask": np.ones(16, bool)}
  results = []
  for n in (1, 8):
    par = strategies.make_parallel("shard_map", n)
    eval_fn = par.eval_step(functools.partial(step.eval_step, outputs=targets.Classes(3)))
    confusion, labels = eval_fn(par.put_state(state), par.put_batch(batch))
    results.append((multihost.to_host(confusion), multihost.gather(labels)))
  np.testing.assert_array_equal(results[0][0], results[1][0])
  np.testing.assert_array_equal(results[0][1], results[1][1])
