"""The 3D path between the stages: patch batches from the volume store against patches
cut from whole volumes with numpy; evaluation of whole volumes against confusion
matrices and Dice counted by hand; prediction of NIfTI volumes written back in the
input's space, read back with nibabel."""

import functools
import os

import jax
import nibabel as nib
import numpy as np
import pytest

import helpers
from medseg_jax.data import patches, synthetic, targets, volume_loader
from medseg_jax.evaluation import evaluate, predict, sliding_window

PATCH = (16, 12, 8)
VOLUMES = ["--config.data.spatial_dims=3", f"--config.data.patch_size={PATCH}",
           "--config.model.name=" + os.path.join(os.path.dirname(__file__),
                                                 "tiny_net3d.py:Tiny3D"),
           "--config.data.preprocess_workers=1"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A dataset of 8 phantoms (24x20x10 voxels of 1x1x2 mm) written as by a run."""
  workdir = tmp_path_factory.mktemp("run")
  synthetic.write_synthetic_decathlon(str(workdir / "data"), 8, 2, shape=(24, 20, 10), seed=3)
  return workdir


def _config(run_dir, *overrides):
  return helpers.config(*VOLUMES, f"--config.data.root={run_dir / 'data'}",
                        f"--config.data.cache_dir={run_dir / 'cache'}", *overrides)


@pytest.fixture(scope="module")
def splits(run_dir):
  return helpers.load_splits(_config(run_dir), str(run_dir))


def _whole(data: volume_loader.VolumeSet):
  """Every volume of a split read whole: the numpy reference the patches are cut from."""
  read = [data.volume(v) for v in range(len(data))]
  return [r[0] for r in read], [r[1] for r in read]


def test_the_volume_splits_hold_every_subject_once_at_the_target_spacing(splits):
  sets, info = splits
  names = [n for s in ("train", "val", "test") for n in sets[s].names]
  assert sorted(names) == [f"phantom_{i:03d}" for i in range(8)]
  assert info["spatial_dims"] == 3 and info["target_spacing"] == [1.0, 1.0, 2.0]
  assert info["volumes"] == {"train": 6, "val": 1, "test": 1}
  assert sets["train"].shapes == ((24, 20, 10),) * 6  # the median spacing: not resampled
  np.testing.assert_allclose(sets["train"].spacing, [[1.0, 1.0, 2.0]] * 6)


@pytest.mark.parametrize("processes", [1, 2])
def test_patch_batches_are_the_draws_cut_from_the_volumes(splits, processes):
  """Each process's rows of every global batch, together, are the patches of the epoch's
  draws cut from the whole volumes, with zeros where a patch sticks out."""
  data = splits[0]["train"]
  images, labels = _whole(data)
  sampler = data.sampler(4)
  epoch_draws = [d for batch in patches.global_batch_draws(sampler, 7, 2, draws=10)
                 for d in batch]
  parts = [list(volume_loader.train_batches(data, 4, 7, 2, p, processes, prefetch=1, draws=10))
           for p in range(processes)]
  got = {k: np.concatenate([np.concatenate([part[b][k] for part in parts])
                            for b in range(len(parts[0]))]) for k in ("image", "label")}
  expected = patches.read_batch(images, labels, epoch_draws, PATCH)
  assert len(epoch_draws) == 8  # 10 draws: two full batches of 4
  assert got["image"].dtype == np.float32 and got["label"].dtype == np.uint8
  np.testing.assert_array_equal(got["image"], expected["image"])
  np.testing.assert_array_equal(got["label"], expected["label"])
  assert any(d.forced for d in epoch_draws) and got["label"].any()


def test_a_resumed_epoch_reads_the_rest_of_the_same_patches(splits, run_dir):
  """From the loader position (offset 4 into the epoch) the batches are those an
  uninterrupted epoch reads after its first batch, through the kind of data's dispatch."""
  data, kind = splits[0]["train"], helpers.run_settings(_config(run_dir)).kind
  whole = list(kind.train_batches(data, 4, 0, 1, 0, 1, 0, 12))
  rest = list(kind.train_batches(data, 4, 0, 1, 0, 1, 4, 12))
  assert len(whole) == 3 and len(rest) == 2
  for a, b in zip(whole[1:], rest):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def _threshold_run(windows: np.ndarray) -> np.ndarray:
  """Probabilities of a 'network' that calls a voxel foreground where its image is above 1."""
  fg = (windows[..., 0] > 1.0).astype(np.float32)
  return np.stack([1.0 - fg, fg], axis=-1)


def test_evaluation_of_whole_volumes_counts_every_voxel(splits, tmp_path):
  """The split's confusion matrix and per-volume Dice are those of the thresholded
  volumes, counted here with numpy."""
  data = splits[0]["train"]
  ev = evaluate.Evaluator(eval_step=None, put_batch=None, global_batch=3, outputs=targets.Classes(2),
                          class_names=["background", "tumour"], workdir=str(tmp_path),
                          predict=evaluate.predict_volumes,
                          windows=sliding_window.Windows(PATCH, overlap=0.5, batch=3),
                          window_run=lambda state: _threshold_run)
  result = evaluate.evaluate(ev, None, data, "val", 5, surface=True)
  images, labels = _whole(data)
  confusion = np.zeros((2, 2), np.int64)
  dice = []
  for image, label in zip(images, labels):
    pred, truth = image[..., 0] > 1.0, label > 0
    for t in (0, 1):
      for p in (0, 1):
        confusion[t, p] += np.sum((truth == t) & (pred == p))
    dice.append(2 * np.sum(pred & truth) / (pred.sum() + truth.sum()))
  assert [c["support"] for c in result["per_class"]] == confusion.sum(1).tolist()
  assert result["per_class"][1]["dice"] == pytest.approx(
      2 * confusion[1, 1] / (confusion[1].sum() + confusion[:, 1].sum()))
  assert result["num_examples"] == 6
  assert result["per_volume"]["dice_1"]["mean"] == pytest.approx(np.mean(dice))
  assert result["per_volume"]["hd95_1"]["count"] == 6
  assert os.path.isfile(tmp_path / "eval" / "montage" / "val_step0000005.png")
  with open(tmp_path / "eval" / "val_per_volume.csv") as f:
    assert len(f.read().splitlines()) == 7  # a header and a row per volume


def test_whole_volumes_of_a_region_network_are_labelled_in_the_declared_order(splits, tmp_path):
  """Two sigmoid outputs for label 1, above 2 and above 1: rebuilt in order, the label map
  is their union (an argmax over the two would pick the larger, not the union)."""
  data = splits[0]["train"]
  def run(windows):
    image = windows[..., 0]
    return np.stack([np.where(image > 2.0, 0.9, 0.2), np.where(image > 1.0, 0.6, 0.1)],
                    axis=-1).astype(np.float32)
  regions = targets.make(2, ((1,), (1,)), (1, 1))
  ev = evaluate.Evaluator(eval_step=None, put_batch=None, global_batch=3, outputs=regions,
                          class_names=["background", "tumour"], workdir=str(tmp_path),
                          predict=evaluate.predict_volumes,
                          windows=sliding_window.Windows(PATCH, overlap=0.5, batch=3),
                          window_run=lambda state: run)
  result = evaluate.evaluate(ev, None, data, "val", 5)
  images, labels = _whole(data)
  pred = np.concatenate([(i[..., 0] > 1.0).ravel() for i in images])
  truth = np.concatenate([(label > 0).ravel() for label in labels])
  dice = 2 * np.sum(pred & truth) / (pred.sum() + truth.sum())
  assert [r["dice"] for r in result["per_region"]] == pytest.approx([dice, dice])
  assert result["dice"] == pytest.approx(dice)


def _write(path, data, affine):
  img = nib.Nifti1Image(data, affine)
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, str(path))


def _sign_run(windows: np.ndarray) -> np.ndarray:
  """One-hot of class 0 where a voxel is 0, 1 where it is negative, 2 where positive."""
  x = windows[..., 0]
  classes = np.where(x == 0, 0, np.where(x < 0, 1, 2))
  return np.eye(3, dtype=np.float32)[classes]


@pytest.mark.parametrize("target,exact", [((1.0, 1.5, 2.0), True), ((3.0, 3.0, 3.0), False)])
def test_a_prediction_is_written_in_the_input_space(tmp_path, target, exact):
  """A label map saved as the image of an oblique, flipped, anisotropic volume: z-scoring
  its non-zero voxels makes label 1 negative and 2 positive, which `_sign_run` turns back
  into the labels. At the input's own spacing (RAS order: 1, 1.5, 2 mm) the written map is
  the label file itself; resampled to 3 mm and back, nearly."""
  rng = np.random.default_rng(0)
  label = np.zeros((18, 26, 14), np.uint8)  # file order; RAS order is (14, 26, 18)
  label[3:12, 5:20, 2:11] = 1
  label[5:9, 9:15, 4:8] = 2
  label[rng.random(label.shape) < 0.01] = 0
  rotation = np.array([[0, 0, -1.0], [0, 1.5, 0], [2.0, 0, 0]])  # axes: S, A, -R
  theta = 0.2
  tilt = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                   [0, 0, 1]])
  affine = np.eye(4)
  affine[:3, :3] = tilt @ rotation
  affine[:3, 3] = (10, -20, 5)
  source = tmp_path / "case.nii.gz"
  _write(source, label.astype(np.float32), affine)
  settings = predict.Volumetric(modalities=(), schemes=("mri",), ct_statistics=None,
                                target_spacing=target,
                                windows=sliding_window.Windows(PATCH, overlap=0.5, batch=4))
  out = tmp_path / "out" / "case.nii.gz"
  planned = predict.plan(str(source), str(out), {"modalities": ["T1w"]})
  predict.predict(functools.partial(predict.predict_volume_3d, settings, ("T1w",)), planned,
                  _sign_run)
  written = nib.load(str(out))
  assert written.shape == label.shape and written.get_data_dtype() == np.uint8
  np.testing.assert_allclose(written.affine, affine)
  labels = np.asarray(written.dataobj)
  if exact:
    np.testing.assert_array_equal(labels, label)
  else:
    assert np.mean(labels == label) > 0.9 and set(np.unique(labels)) == {0, 1, 2}


def test_3d_augmentation_comes_from_the_data_augment_keys(run_dir):
  """With data.spatial_dims=3 the train step's augmentation transforms whole patches:
  identity ranges leave a batch as it is; flip_probability=1 mirrors it along D, H, W."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 8, 6, 4, 1)).astype(np.float32)
  labels = rng.integers(0, 2, size=(2, 8, 6, 4)).astype(np.int32)
  identity = ["--config.data.augment.enabled=True", "--config.data.augment.rotation_degrees=0.0",
              "--config.data.augment.zoom=(1.0, 1.0)"]
  key = jax.random.key(0)
  augmentation = lambda *overrides: helpers.run_settings(
      _config(run_dir, *overrides)).kind.augmentation()
  same = augmentation(*identity)(key, images, labels)
  np.testing.assert_allclose(same[0], images, atol=1e-6)
  np.testing.assert_array_equal(same[1], labels)
  flipped = augmentation(*identity, "--config.data.augment.flip_probability=1.0")(
      key, images, labels)
  np.testing.assert_allclose(flipped[0], images[:, ::-1, ::-1, ::-1], atol=1e-6)
  np.testing.assert_array_equal(flipped[1], labels[:, ::-1, ::-1, ::-1])
  assert augmentation() is None  # off by default
