"""Cropping to the non-zero box: the box against the non-zero voxels' coordinates, and a
prediction made inside it placed back where the voxels were (a NIfTI file written here,
a pointwise `run` whose answer is known for every voxel)."""

import nibabel as nib
import numpy as np
import pytest

from medseg_jax.data import crop
from medseg_jax.evaluation import predict, sliding_window


def _image(shape=(12, 10, 8), box=(slice(3, 9), slice(2, 7), slice(1, 6)), seed=0):
  """A one-channel image, zero outside `box`; inside, random values, some of them zero."""
  rng = np.random.default_rng(seed)
  image = np.zeros(shape + (1,), np.float32)
  inside = rng.uniform(1, 2, size=[s.stop - s.start for s in box] + [1])
  inside[rng.random(inside.shape) < 0.3] = 0
  inside[0, 0, 0] = inside[-1, -1, -1] = 1.5  # the box's corners are non-zero
  image[box] = inside
  return image


@pytest.mark.parametrize("box", [(slice(3, 9), slice(2, 7), slice(1, 6)),
                                 (slice(0, 12), slice(0, 10), slice(0, 8)),
                                 (slice(5, 6), slice(9, 10), slice(0, 1))])
def test_the_box_is_the_span_of_the_non_zero_voxels(box):
  image = _image(box=box)
  where = np.argwhere(image[..., 0] != 0)
  expected = tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(where.min(0), where.max(0)))
  assert crop.nonzero_box(image) == expected
  assert crop.shape_of(expected) == [s.stop - s.start for s in expected]


def test_an_image_of_zeros_keeps_its_whole_volume():
  assert crop.nonzero_box(np.zeros((4, 5, 6, 2))) == (slice(0, 4), slice(0, 5), slice(0, 6))


def test_a_channel_non_zero_where_another_is_zero_widens_the_box():
  image = np.zeros((6, 6, 6, 2))
  image[1, 2, 3, 0] = 1
  image[4, 5, 3, 1] = -2
  assert crop.nonzero_box(image) == (slice(1, 5), slice(2, 6), slice(3, 4))


@pytest.mark.parametrize("cropped", [False, True])
def test_a_cropped_prediction_lands_on_the_voxels_it_was_made_for(tmp_path, cropped):
  """A `run` answering class 1 exactly where its input is non-zero: the labels predicted
  equal the file's non-zero voxels, cropped or not, and outside the box a cropped
  prediction is background with probability 1."""
  image = _image()
  path = str(tmp_path / "case.nii.gz")
  nib.save(nib.Nifti1Image(image, np.eye(4)), path)
  windows = sliding_window.Windows(patch=(4, 4, 4), overlap=0.5, gaussian_sigma=0.125,
                                   mirror=False, batch=3)
  settings = predict.Volumetric(modalities=(), schemes=("mri",), ct_statistics=None,
                                target_spacing=(1.0, 1.0, 1.0), windows=windows,
                                crop_nonzero=cropped)

  def run(examples):
    hit = (examples[..., 0] != 0).astype(np.float32)
    return np.stack([1 - hit, hit], -1)
  probs = predict.predict_volume_3d(settings, ("T1w",), path, run)
  assert probs.shape == image.shape[:3] + (2,)
  np.testing.assert_array_equal(probs.argmax(-1), image[..., 0] != 0)
  if cropped:
    outside = np.ones(image.shape[:3], bool)
    outside[3:9, 2:7, 1:6] = False
    np.testing.assert_array_equal(probs[outside], np.tile([1.0, 0.0], (outside.sum(), 1)))
