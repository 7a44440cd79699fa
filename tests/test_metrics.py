"""Metrics from a hand-built confusion matrix; the on-device matrix over 8 devices."""

import functools

import jax
import numpy as np
import pytest

from medseg_jax import metrics, parallel
from medseg_jax.models import UNet
from medseg_jax.state import TrainState
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


@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_confusion_matrix_over_8_devices_matches_numpy(devices8, strategy):
  """Eval on 8 shards with a padded batch equals a confusion matrix counted in numpy."""
  model = UNet(num_classes=3, depth=2, base_features=4)
  variables = model.init(jax.random.key(0), np.zeros((1, 32, 32, 1), np.float32))
  state = TrainState.create(apply_fn=model.apply, params=variables["params"], model_state={},
                            tx=optax.sgd(0.1))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(16, 32, 32, 1)).astype(np.float32),
           "label": rng.integers(0, 3, (16, 32, 32)).astype(np.int32),
           "mask": np.arange(16) < 11}  # the last 5 rows are padding
  pred = np.argmax(np.asarray(model.apply(variables, batch["image"])), -1)
  expected = np.zeros((3, 3), np.int64)
  np.add.at(expected, (batch["label"][:11].ravel(), pred[:11].ravel()), 1)
  par = parallel.make_parallel(strategy, 8)
  got = parallel.to_host(par.eval_step(3)(par.put_state(state), par.put_batch(batch)))
  np.testing.assert_array_equal(got, expected)
