"""Predictions land in the input's voxel grid: checked against label files read back with nibabel."""

import os

import jax
import nibabel as nib
import numpy as np
import pytest

from configs import base
from medseg_jax import infer
from medseg_jax.data import decathlon, preprocess, synthetic
from medseg_jax.errors import DataError, MedsegError


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("d") / "Task99")
  return synthetic.write_synthetic_decathlon(root, 2, 1, shape=(40, 36, 10), seed=1)


def test_label_map_written_back_equals_the_label_file(dataset_dir, tmp_path):
  """One-hot of the canonical labels, written back, reproduces the file on disk exactly."""
  path = os.path.join(dataset_dir, "labelsTr", "phantom_000.nii.gz")
  canonical, _, _ = decathlon.load_nifti(path)
  out = str(tmp_path / "pred.nii.gz")
  infer._write_label_map(path, np.asarray(jax.nn.one_hot(canonical, 3)), out)
  written, original = nib.load(out), nib.load(path)
  assert written.get_data_dtype() == np.uint8
  np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
  np.testing.assert_allclose(written.affine, original.affine)
  assert written.header.get_zooms() == original.header.get_zooms()


def test_resizing_is_undone(dataset_dir):
  """Slices resized to 32x32 and back agree with the original labels almost everywhere."""
  cfg = base.get_config()
  cfg.data.image_size = 32
  image_path = os.path.join(dataset_dir, "imagesTr", "phantom_001.nii.gz")
  label, _, _ = decathlon.load_nifti(os.path.join(dataset_dir, "labelsTr", "phantom_001.nii.gz"))
  _, label_slices = preprocess.to_slices(label[..., None].astype(np.float32), label, 2, 0, 32)
  oracle = lambda slices: np.asarray(jax.nn.one_hot(label_slices, 3))  # a perfect model
  probs = infer._predict_volume(cfg, {"modalities": ["T1w"]}, image_path, oracle)
  assert probs.shape[:3] == label.shape
  assert np.mean(np.argmax(probs, -1) == label) > 0.97


def test_inputs_are_checked_before_anything_is_written(dataset_dir, tmp_path):
  with pytest.raises(DataError, match="no .nii"):
    infer.find_inputs(str(tmp_path))
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(DataError, match="notes.txt: not a NIfTI"):
    infer.find_inputs(str(tmp_path / "notes.txt"))
  four_d = synthetic.write_synthetic_decathlon(str(tmp_path / "m"), 1, 0, (16, 16, 4),
                                               multimodal=True)
  with pytest.raises(DataError, match="modalities"):
    infer.check_input(os.path.join(four_d, "imagesTr", "phantom_000.nii.gz"), 1)
  existing = tmp_path / "out.nii.gz"
  existing.write_bytes(b"")
  with pytest.raises(MedsegError, match="--overwrite"):
    infer.output_paths([os.path.join(dataset_dir, "imagesTs", "phantom_002.nii.gz")],
                       "in.nii.gz", str(existing), overwrite=False)
