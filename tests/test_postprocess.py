"""Keeping the largest connected component: planted islands removed, the body kept, the
decision taken only where it raises Dice, and prediction applying it."""

import nibabel as nib
import numpy as np
import pytest

from helpers import config
from medseg_jax import config as config_check
from medseg_jax.errors import ConfigError
from medseg_jax.evaluation import postprocess, predict


def body_with_island():
  """A 10x10x10 label map: a class-1 body (a 4x4x4 cube) touching a class-2 core, and a
  one-voxel class-1 island far away (touching the body only through nothing)."""
  labels = np.zeros((10, 10, 10), np.uint8)
  labels[1:5, 1:5, 1:5] = 1
  labels[2:4, 2:4, 2:4] = 2
  labels[8, 8, 8] = 1
  return labels


def test_the_largest_foreground_component_removes_the_island_and_keeps_the_body():
  labels = body_with_island()
  kept = postprocess.apply(labels, foreground=True, classes=())
  expected = labels.copy()
  expected[8, 8, 8] = 0
  np.testing.assert_array_equal(kept, expected)
  # a corner-touching voxel is part of the body (26-connectivity)
  labels[5, 5, 5] = 1
  assert postprocess.apply(labels, True, ())[5, 5, 5] == 1


def test_per_class_components_act_on_one_class_only():
  labels = body_with_island()
  labels[7, 1, 1] = 2  # a class-2 island
  kept = postprocess.apply(labels, foreground=False, classes=(2,))
  assert kept[7, 1, 1] == 0 and kept[8, 8, 8] == 1  # class 1's island stays
  assert (kept[2:4, 2:4, 2:4] == 2).all()


def test_post_processing_is_kept_only_where_it_helps():
  """Predictions with a false-positive island: removing it raises Dice. Where the truth
  itself has a second component the prediction found, removing it lowers Dice."""
  truth = body_with_island()
  truth[8, 8, 8] = 0
  with_island = truth.copy()
  with_island[8, 7, 8] = 1                 # a false positive far from the body
  helps = postprocess.decide([(with_island, truth)], 3)
  assert helps["foreground"] is True and helps["classes"] == []
  assert helps["mean_dice"]["chosen"] > helps["mean_dice"]["none"]
  two_parts = truth.copy()
  two_parts[7:9, 7:9, 7:9] = 1             # a real second lesion, predicted
  hurts = postprocess.decide([(two_parts.copy(), two_parts)], 3)
  assert hurts["foreground"] is False and hurts["classes"] == []
  assert hurts["mean_dice"]["chosen"] == hurts["mean_dice"]["none"] == 1.0


def test_prediction_writes_the_post_processed_label_map(tmp_path):
  labels = body_with_island()
  probs = np.eye(3, dtype=np.float32)[labels]   # one-hot: argmax gives `labels`
  src = tmp_path / "input.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.float32), np.eye(4)), src)
  out = tmp_path / "labels.nii.gz"
  post = postprocess.from_config(config("--config.evaluation.largest_component_foreground=True")
                                 .evaluation)
  predict.write_prediction(str(src), probs, str(out), None, post)
  written = np.asarray(nib.load(out).dataobj)
  assert written[8, 8, 8] == 0 and (written[1:5, 1:5, 1:5] > 0).all()


def test_bad_classes_are_a_config_error(devices8):
  with pytest.raises(ConfigError, match=r"^evaluation\.largest_component_classes=\(0,\)"):
    config_check.check(config("--config.evaluation.largest_component_classes=(0,)"))
