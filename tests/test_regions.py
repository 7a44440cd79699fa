"""Region-based training (`data.regions`): labels rebuilt in the declared order, the
sigmoid losses, region metrics from the label confusion matrix, and a tiny run that
trains, selects, predicts and exports on regions; each checked against NumPy by hand."""

import json

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

import helpers
from helpers import TINY
from medseg_jax.data import targets
from medseg_jax.errors import ConfigError
from medseg_jax.evaluation import metrics
from medseg_jax.training import losses

BRATS = ((1, 2, 3), (2, 3), (3,))  # whole tumour, tumour core, enhancing tumour


def _by_hand(probs: np.ndarray, order) -> np.ndarray:
  """Each region's label written where its probability exceeds 0.5, later ones on top."""
  out = np.zeros(probs.shape[:-1], np.int64)
  for r, label in enumerate(order):
    out[probs[..., r] > 0.5] = label
  return out


def test_labels_are_rebuilt_in_the_declared_order():
  probs = np.random.default_rng(0).uniform(size=(6, 7, 5, 3)).astype(np.float32)
  nested = targets.make(4, BRATS)
  assert nested.order == (1, 2, 3) and nested.count == 3
  np.testing.assert_array_equal(nested.labels(probs), _by_hand(probs, (1, 2, 3)))
  np.testing.assert_array_equal(np.asarray(nested.labels(jnp.asarray(probs), jnp)),
                                _by_hand(probs, (1, 2, 3)))
  declared = targets.make(4, BRATS, (2, 3, 3))
  np.testing.assert_array_equal(declared.labels(probs), _by_hand(probs, (2, 3, 3)))
  masks = nested.masks(np.array([0, 1, 2, 3]))
  np.testing.assert_array_equal(masks, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]])
  assert nested.record() == {"regions": [[1, 2, 3], [2, 3], [3]],
                             "regions_class_order": [1, 2, 3], "num_labels": 4}
  assert targets.from_info({"num_classes": 3, **nested.record()}) == nested
  assert targets.from_info({"num_classes": 3}) == targets.Classes(3)


@pytest.mark.parametrize("regions,order,message", [
    (((1, 2), (0,)), (), "data.regions[1]=(0,): a region is a non-empty tuple of foreground "
                         "labels (positive integers), e.g. (2, 3)"),
    (((1, 1),), (), "data.regions[0]=(1, 1): a label is listed twice"),
    ((1, 2), (), "data.regions[0]=1: a region is a non-empty tuple"),
    (((1, 2), (2,)), (1,), "data.regions_class_order=(1,): one label per region (2 regions)"),
    (((1, 2), (2,)), (2, 2), None),
    (((1, 2), (2,)), (3, 2), "data.regions_class_order=(3, 2): label 3 is not in region 0 (1, 2)"),
    (((2,), (1, 2)), (), "data.regions[0]=(2,): every label of it is in a later region; set "
                         "data.regions_class_order"),
    ((), (1,), "data.regions_class_order=(1,): needs data.regions"),
    (((1, 5),), (), "data.regions[0]=(1, 5): the dataset's labels are 0..2"),
])
def test_regions_that_cannot_be_used_are_one_line_naming_the_key(regions, order, message):
  if message is None:
    assert targets.make(3, regions, order).order == order
    return
  with pytest.raises(ConfigError) as error:
    targets.make(3, regions, order)
  assert str(error.value).startswith(message)


def test_the_region_losses_equal_their_numpy_formulas():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 6, 3)).astype(np.float32) * 3
  labels = rng.integers(0, 4, (2, 5, 6))
  masks = np.stack([np.isin(labels, r) for r in BRATS], -1).astype(np.float64)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(masks * np.log(p) + (1 - masks) * np.log(1 - p)).mean(axis=(1, 2, 3))
  inter, total = (p * masks).sum(axis=(1, 2)), p.sum(axis=(1, 2)) + masks.sum(axis=(1, 2))
  dice = 1 - ((2 * inter + 1) / (total + 1)).mean(-1)
  regions = targets.make(4, BRATS)
  spec = lambda name: losses.loss_component(name)
  for name, expected in (("ce", bce), ("dice", dice), ("dice_ce", bce + dice)):
    got = losses.for_outputs(spec(name), regions)(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-6)
  # the classes keep the softmax losses
  assert losses.for_outputs(spec("dice_ce"), targets.Classes(4)) is losses.dice_ce_loss


def test_region_metrics_from_the_confusion_matrix_equal_hand_built_masks():
  rng = np.random.default_rng(2)
  truth, pred = rng.integers(0, 4, (3, 9, 9, 4)), rng.integers(0, 4, (3, 9, 9, 4))
  m = metrics.segmentation_metrics(metrics.confusion_matrix(truth, pred, 4), BRATS)
  hand = []
  for region in BRATS:
    t, p = np.isin(truth, region), np.isin(pred, region)
    hand.append(2 * (t & p).sum() / (t.sum() + p.sum()))
    assert m["per_region"][len(hand) - 1]["iou"] == pytest.approx((t & p).sum() / (t | p).sum())
  assert [r["dice"] for r in m["per_region"]] == pytest.approx(hand)
  assert m["dice"] == m["dice_foreground"] == pytest.approx(np.mean(hand))
  assert len(m["per_class"]) == 4  # the labels are still described
  row = metrics.volume_metrics(pred[0], truth[0], (1, 1, 1), 4, False, BRATS)
  t, p = np.isin(truth[0], (2, 3)), np.isin(pred[0], (2, 3))
  assert row["dice_region2"] == pytest.approx(2 * (t & p).sum() / (t.sum() + p.sum()))
  assert row["dice_3"] == pytest.approx(2 * ((truth[0] == 3) & (pred[0] == 3)).sum()
                                        / ((truth[0] == 3).sum() + (pred[0] == 3).sum()))


REGIONS = ["--config.data.label_map=()", "--config.data.regions=((1, 2), (2,))"]


def test_a_region_run_trains_selects_predicts_and_exports_on_its_regions(tmp_path):
  """Synthetic labels: 1 oedema around 2 tumour. Regions: the whole tumour (1, 2) and the
  tumour core (2,), written back as 1 and 2."""
  from medseg_jax.export import from_file, onnx_graph, write  # pylint: disable=import-outside-toplevel
  cfg = helpers.config(*TINY[1:], *REGIONS, "--config.train.num_steps=6",
                       "--config.train.eval_every_steps=3", "--config.checkpoint.every_steps=3")
  workdir = tmp_path / "run"
  helpers.train(cfg, workdir)
  info = json.loads((workdir / "data_info.json").read_text())
  assert (info["num_classes"], info["regions"], info["regions_class_order"]) == (
      2, [[1, 2], [2]], [1, 2])
  val = json.loads((workdir / "eval" / "val_metrics.json").read_text())
  assert [r["labels"] for r in val["per_region"]] == [[1, 2], [2]]
  assert val["dice"] == pytest.approx(np.nanmean([r["dice"] for r in val["per_region"]]))
  assert len(val["per_class"]) == 3
  logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in logged if "val_dice" in r][-1]
  assert last["val_dice_region2"] == val["per_region"][1]["dice"] and "val_per_region" not in last
  image = sorted((workdir / "data" / "imagesTr").iterdir())[0]
  out = tmp_path / "pred"
  helpers.predict(cfg, workdir, str(image), str(out), probabilities=True)
  name = image.name
  labels = np.asarray(nib.load(out / name).dataobj)
  probs = nib.load(out / name.replace(".nii.gz", "_probs.nii.gz")).get_fdata()
  assert probs.shape == labels.shape + (2,) and 0 <= probs.min() and probs.max() <= 1
  np.testing.assert_array_equal(labels, _by_hand(probs, (1, 2)))
  model = str(tmp_path / "regions.zip")
  write.export_run(str(workdir), "latest", model)
  from_file.predict_files(from_file.load(model), str(image), str(tmp_path / "file"),
                          engine="jax", probabilities=True)
  assert (tmp_path / "file" / name).read_bytes() == (out / name).read_bytes()
  if not onnx_graph.available():  # without the ONNX extra the file has no graph
    return
  from_file.predict_files(from_file.load(model, engine="onnxruntime"), str(image), str(tmp_path / "onnx"), engine="onnxruntime",
                          probabilities=True)
  theirs = nib.load(tmp_path / "onnx" / name.replace(".nii.gz", "_probs.nii.gz")).get_fdata()
  np.testing.assert_allclose(theirs, probs, atol=1e-4)  # sigmoid, not softmax, in the graph


def test_out_of_fold_decisions_score_the_regions():
  """A planted island of label 2 away from the body: the regions' Dice (whole (1, 2),
  core (2,)) by hand, and the largest foreground component kept because it raises it;
  no class is decided on its own."""
  from medseg_jax.evaluation import postprocess  # pylint: disable=import-outside-toplevel
  truth = np.zeros((12, 12, 6), np.int64)
  truth[2:7, 2:7, 1:5] = 1
  truth[3:6, 3:6, 2:4] = 2
  pred = truth.copy()
  pred[9:11, 9:11, 1:3] = 2  # the island
  regions = ((1, 2), (2,))
  got = postprocess.class_dice([(pred, truth)], 3, regions)
  hand = [2 * (np.isin(pred, r) & np.isin(truth, r)).sum()
          / (np.isin(pred, r).sum() + np.isin(truth, r).sum()) for r in regions]
  np.testing.assert_allclose(got, hand)
  decision = postprocess.decide([(pred, truth)], 3, regions)
  assert decision["foreground"] is True and decision["classes"] == []
  assert decision["mean_dice"]["chosen"] == pytest.approx(1.0)
  assert decision["mean_dice"]["none"] == pytest.approx(np.mean(hand))
