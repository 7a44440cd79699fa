"""Predictions land in the input's voxel grid: checked against label files read back with nibabel."""

import json
import os

import jax
import nibabel as nib
import numpy as np
import optax
import pytest

import helpers
from medseg_jax import defaults
from medseg_jax.training import checkpoint, setup
from medseg_jax.evaluation import predict
from medseg_jax.data import decathlon, preprocess, synthetic
from medseg_jax.errors import ConfigError, DataError, MedsegError
from medseg_jax.parallel import strategies


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("d") / "Task99")
  return synthetic.write_synthetic_decathlon(root, 2, 1, shape=(40, 36, 10), seed=1)


def test_label_map_written_back_equals_the_label_file(dataset_dir, tmp_path):
  """One-hot of the canonical labels, written back, reproduces the file on disk exactly."""
  path = os.path.join(dataset_dir, "labelsTr", "phantom_000.nii.gz")
  canonical = decathlon.load_nifti(path).data
  out = str(tmp_path / "pred.nii.gz")
  predict.write_prediction(path, np.asarray(jax.nn.one_hot(canonical, 3)), out)
  written, original = nib.load(out), nib.load(path)
  assert written.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
  np.testing.assert_allclose(written.affine, original.affine)
  assert written.header.get_zooms() == original.header.get_zooms()


def test_resizing_is_undone(dataset_dir):
  """Slices resized to 32x32 and back agree with the original labels almost everywhere."""
  cfg = defaults.get_config()
  cfg.data.image_size = 32
  image_path = os.path.join(dataset_dir, "imagesTr", "phantom_001.nii.gz")
  label = decathlon.load_nifti(os.path.join(dataset_dir, "labelsTr", "phantom_001.nii.gz")).data
  _, label_slices = preprocess.to_slices(label[..., None].astype(np.float32), label,
                                        preprocess.settings_from_config(cfg.data),
                                        keep=np.arange(label.shape[2]))
  oracle = lambda slices: np.asarray(jax.nn.one_hot(label_slices, 3))  # a perfect model
  probs = predict.predict_volume(preprocess.settings_from_config(cfg.data), ("T1w",),
                                 image_path, oracle)
  assert probs.shape[:3] == label.shape
  assert np.mean(np.argmax(probs, -1) == label) > 0.97


def test_inputs_are_checked_before_anything_is_written(dataset_dir, tmp_path):
  with pytest.raises(DataError, match="no .nii"):
    predict.find_inputs(str(tmp_path))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(DataError, match="notes.txt: not a NIfTI"):
    predict.find_inputs(str(tmp_path / "notes.txt"))
  four_d = synthetic.write_synthetic_decathlon(str(tmp_path / "m"), 1, 0, (16, 16, 4),
                                               multimodal=True)
  with pytest.raises(DataError, match="modalities"):
    predict.check_input(os.path.join(four_d, "imagesTr", "phantom_000.nii.gz"), 1)
  existing = tmp_path / "out.nii.gz"
  existing.write_bytes(b"")
  with pytest.raises(MedsegError, match="--overwrite"):
    predict.output_paths([os.path.join(dataset_dir, "imagesTs", "phantom_002.nii.gz")],
                       "in.nii.gz", str(existing), overwrite=False)


def _oblique_affine(spacing, degrees=25.0):
  """Voxel axes permuted and flipped, then rotated about z: far from RAS, anisotropic."""
  t = np.deg2rad(degrees)
  rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
  permute = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])  # i -> +y, j -> -x
  affine = np.eye(4)
  affine[:3, :3] = rotation @ permute @ np.diag(spacing)
  affine[:3, 3] = [12.0, -30.0, 5.0]
  return affine


@pytest.mark.parametrize("shape,size,resize,exact", [((32, 32, 10), 32, "resize", True),
                                                     ((40, 32, 10), 32, "resize", False),
                                                     ((40, 27, 10), 32, "pad_crop", False)])
def test_oblique_anisotropic_volume_round_trips(tmp_path, shape, size, resize, exact):
  """A perfect model's prediction, written back, matches the label file read with nibabel."""
  rng = np.random.default_rng(0)
  _, label = synthetic.make_phantom(rng, shape)
  image, _ = synthetic.make_phantom(rng, shape)
  affine = _oblique_affine((0.8, 1.3, 3.0))
  image_path, label_path = str(tmp_path / "img.nii.gz"), str(tmp_path / "lbl.nii.gz")
  nib.save(nib.Nifti1Image(image[..., 0], affine), image_path)
  nib.save(nib.Nifti1Image(label, affine), label_path)
  cfg = defaults.get_config()
  cfg.data.image_size, cfg.data.resize = size, resize
  canonical = decathlon.load_nifti(label_path).data
  assert canonical.shape != label.shape or not np.array_equal(canonical, label)  # reoriented
  _, label_slices = preprocess.to_slices(canonical[..., None].astype(np.float32), canonical,
                                         preprocess.settings_from_config(cfg.data),
                                         keep=np.arange(canonical.shape[2]))
  oracle = lambda slices: np.asarray(jax.nn.one_hot(label_slices, 3))
  probs = predict.predict_volume(preprocess.settings_from_config(cfg.data), ("T1w",),
                                 image_path, oracle)
  out = str(tmp_path / "pred.nii.gz")
  predict.write_prediction(image_path, probs, out, str(tmp_path / "probs.nii.gz"))
  written, source = nib.load(out), nib.load(label_path)
  assert written.shape == source.shape and written.get_data_dtype() == np.uint8
  np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
  truth, pred = np.asarray(source.dataobj), np.asarray(written.dataobj)
  if exact:
    np.testing.assert_array_equal(pred, truth)
  elif resize == "pad_crop":  # only the cropped border (background, by the oracle) can differ
    inside = np.asarray(nib.load(out).dataobj) == truth
    assert np.mean(inside) > 0.95 and np.mean(inside[truth > 0]) > 0.99
  else:
    assert np.mean(pred == truth) > 0.95
  probs_img = nib.load(str(tmp_path / "probs.nii.gz"))
  assert probs_img.shape == source.shape + (3,)
  np.testing.assert_array_equal(np.argmax(probs_img.get_fdata(), -1), pred)


def _tiny_config(features: int):
  cfg = defaults.get_config()
  cfg.data.image_size, cfg.model.depth, cfg.model.base_features = 32, 2, features
  cfg.parallel.num_devices = 1  # compiles in a fraction of the time of 8
  return cfg


@pytest.fixture(scope="module")
def mixed_workdir(tmp_path_factory):
  """Checkpoints of two models: step 1 (4 features) is the best, step 2 (8 features) the
  latest, each with its own config in its meta."""
  workdir = str(tmp_path_factory.mktemp("mixed"))
  with open(os.path.join(workdir, "data_info.json"), "w") as f:
    json.dump({"modalities": ["T1w"], "num_classes": 3, "channels": 1}, f)
  par = strategies.make_parallel("shard_map", 1)
  ckpt = checkpoint.Checkpointer(workdir, 5)
  for step, features in ((1, 4), (2, 8)):
    cfg = _tiny_config(features)
    state = setup.build_state(helpers.run_settings(cfg), par, 3, 1,
                              optax.constant_schedule(0.0),
                              jax.random.key(step))
    meta = {"step": step, "config": cfg.to_dict()}
    ckpt.save(step, state, meta)
    if step == 1:
      ckpt.save_if_best(step, state, meta, dice=0.9)
  ckpt.close()
  return workdir


@pytest.mark.parametrize("which", ["best", "1"])
def test_the_checkpoint_loaded_is_checked_against_its_own_config(dataset_dir, mixed_workdir,
                                                                 tmp_path, which):
  """Evaluate and predict restore through one function that reads the chosen checkpoint's
  meta: the best and step 1 (4 features) load with their own model although the latest
  has 8, and the latest's model is refused for them."""
  features, other = 4, 8
  source = os.path.join(dataset_dir, "imagesTs", "phantom_002.nii.gz")
  out = str(tmp_path / "pred.nii.gz")
  helpers.predict(_tiny_config(features), mixed_workdir, source, out, which)
  written = nib.load(out)
  assert written.shape == nib.load(source).shape and written.get_data_dtype() == np.uint8
  with pytest.raises(ConfigError, match=rf"^model.base_features: {other} in the config but "
                                        rf"{features} in the checkpoints in \S*/checkpoints "):
    helpers.predict(_tiny_config(other), mixed_workdir, source, str(tmp_path / "x.nii.gz"),
                  which)
  assert not os.path.exists(tmp_path / "x.nii.gz")
