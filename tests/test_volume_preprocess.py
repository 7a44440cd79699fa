"""3D preprocessing against hand computations: resampling to a spacing and back, the
per-channel volume normalisation (MRI z-score, CT clipped to foreground percentiles)."""

import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.data import preprocess, resample, synthetic
from medseg_jax.errors import DataError


def linear_reference(volume: np.ndarray, shape: tuple) -> np.ndarray:
  """Linear interpolation by hand: output voxel centre i maps to the input position
  (i + 0.5) * n / m - 0.5 (the grid's extent kept), clamped to the border voxels."""
  axes = [np.clip((np.arange(m) + 0.5) * n / m - 0.5, 0, n - 1)
          for n, m in zip(volume.shape, shape)]
  coords = np.meshgrid(*axes, indexing="ij")
  return ndimage.map_coordinates(volume.astype(np.float64), coords, order=1)


def phantom_label(shape, seed=0) -> np.ndarray:
  return synthetic.make_phantom(np.random.default_rng(seed), shape)[1]


@pytest.mark.parametrize("shape,spacing,target,expected", [
    ((24, 24, 10), (1.0, 1.0, 2.0), (1.5, 1.5, 1.5), (16, 16, 13)),
    ((33, 20, 7), (0.7, 1.3, 3.1), (1.0, 1.0, 1.0), (23, 26, 22)),
    ((5, 5, 5), (1.0, 1.0, 1.0), (9.0, 9.0, 9.0), (1, 1, 1)),
])
def test_target_shape_is_shape_times_spacing_over_target_rounded(shape, spacing, target,
                                                                   expected):
  assert resample.target_shape(shape, spacing, target) == expected
  image = np.random.default_rng(0).normal(size=shape + (2,)).astype(np.float32)
  assert resample.resample_image(image, expected).shape == expected + (2,)
  assert resample.resample_label(phantom_label(shape), expected).shape == expected


def test_equal_spacing_is_the_identity_exactly():
  rng = np.random.default_rng(1)
  image = rng.normal(size=(9, 8, 7, 3)).astype(np.float32)
  label = rng.integers(0, 3, (9, 8, 7)).astype(np.uint8)
  shape = resample.target_shape(label.shape, (1.2, 0.8, 2.5), (1.2, 0.8, 2.5))
  assert shape == label.shape
  out = resample.resample_image(image, shape)
  assert out.dtype == np.float32 and np.array_equal(out, image)
  out = resample.resample_label(label, shape)
  assert out.dtype == np.uint8 and np.array_equal(out, label)


@pytest.mark.parametrize("shape", [(14, 11, 9), (40, 40, 30)])
def test_image_and_labels_resample_linearly_keeping_the_extent(shape):
  rng = np.random.default_rng(2)
  image = rng.normal(size=(20, 17, 12, 2)).astype(np.float32)
  out = resample.resample_image(image, shape)
  for c in range(2):
    np.testing.assert_allclose(out[..., c], linear_reference(image[..., c], shape), atol=1e-5)
  label = phantom_label((20, 17, 12), seed=3)
  weights = np.stack([linear_reference((label == c).astype(np.float32), shape)
                      for c in range(3)], -1)
  expected = weights.argmax(-1)  # the lower class on a tie, as the module does
  ties = np.sort(weights, -1)[..., -1] - np.sort(weights, -1)[..., -2] < 1e-6
  got = resample.resample_label(label, shape)
  assert got.dtype == label.dtype
  np.testing.assert_array_equal(got[~ties], expected[~ties])


@pytest.mark.parametrize("spacing,target", [((1.0, 1.0, 2.0), (1.5, 1.5, 1.5)),
                                            ((1.0, 1.0, 2.0), (0.7, 0.7, 1.3)),
                                            ((0.8, 1.0, 1.0), (2.0, 2.0, 3.0))])
def test_round_trip_keeps_every_unambiguous_label(spacing, target):
  label = phantom_label((48, 48, 24), seed=4)
  there = resample.target_shape(label.shape, spacing, target)
  back = resample.resample_label(resample.resample_label(label, there), label.shape)
  assert back.shape == label.shape
  # A voxel is unambiguous when every voxel within (ratio + 1) voxels along each axis
  # has its label: both interpolations draw only on that neighbourhood.
  size = [2 * (int(np.ceil(max(t / s, s / t))) + 1) + 1 for s, t in zip(spacing, target)]
  clear = ndimage.minimum_filter(label, size) == ndimage.maximum_filter(label, size)
  assert clear.mean() > 0.5 and clear[label > 0].any()
  np.testing.assert_array_equal(back[clear], label[clear])


def test_probabilities_resampled_back_stay_distributions():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(10, 12, 7, 4))
  probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
  out = resample.resample_probabilities(probs, (23, 17, 11))
  assert out.shape == (23, 17, 11, 4) and out.min() >= 0
  np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_median_spacing_per_axis():
  spacings = [(1.0, 0.8, 3.0), (0.9, 0.8, 5.0), (1.2, 0.7, 2.5), (1.0, 0.9, 2.0)]
  assert resample.median_spacing(spacings) == (1.0, 0.8, 2.75)


def zscore_reference(channel: np.ndarray) -> np.ndarray:
  inside = channel != 0
  out = np.zeros(channel.shape)
  values = channel[inside].astype(np.float64)
  out[inside] = (values - values.mean()) / values.std()
  return out


def test_mri_channels_are_z_scored_over_their_nonzero_voxels():
  rng = np.random.default_rng(6)
  image = rng.normal(50, 10, (12, 10, 8, 2)).astype(np.float32)
  image[:3, ..., 0] = 0
  image[..., -2:, 1] = 0
  out = preprocess.normalise_volume(image, ("mri", "mri"))
  assert out.dtype == np.float32
  for c in range(2):
    np.testing.assert_allclose(out[..., c], zscore_reference(image[..., c]), atol=1e-5)


def test_ct_is_clipped_to_training_foreground_percentiles_then_z_scored():
  rng = np.random.default_rng(7)
  volumes = [rng.normal(40, 200, (10, 9, 8, 1)).astype(np.float32) for _ in range(3)]
  labels = [(rng.random((10, 9, 8)) < f).astype(np.int32) * 2 for f in (0.2, 0.4, 0.1)]
  samples = [preprocess.foreground_intensities(v, l) for v, l in zip(volumes, labels)]
  stats = preprocess.ct_statistics(samples, (0.5, 99.5))
  pooled = np.concatenate([v[..., 0][l > 0] for v, l in zip(volumes, labels)]).astype(np.float64)
  low, high = np.percentile(pooled, [0.5, 99.5])
  mean, std = pooled.mean(), pooled.std()
  np.testing.assert_allclose([stats["low"][0], stats["high"][0], stats["mean"][0],
                              stats["std"][0]], [low, high, mean, std], rtol=1e-6)
  assert stats["voxels"] == len(pooled)
  for volume in volumes:
    expected = (np.clip(volume[..., 0].astype(np.float64), low, high) - mean) / std
    got = preprocess.normalise_volume(volume, ("ct",), stats)[..., 0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.min() >= (low - mean) / std - 1e-5 and got.max() <= (high - mean) / std + 1e-5


def test_foreground_intensities_are_capped_evenly():
  image = np.arange(1000, dtype=np.float32).reshape(10, 10, 10, 1)
  label = np.zeros((10, 10, 10), np.int32)
  label[2:8] = 1  # voxels 200..799
  got = preprocess.foreground_intensities(image, label, cap=7)
  np.testing.assert_array_equal(got[:, 0], [200, 300, 400, 500, 599, 699, 799])
  assert len(preprocess.foreground_intensities(image, label, cap=10_000)) == 600


def test_no_foreground_for_ct_statistics_is_a_data_error():
  with pytest.raises(DataError, match="no foreground voxel"):
    preprocess.ct_statistics([np.zeros((0, 1), np.float32)], (0.5, 99.5))


def test_scheme_from_the_modality_name_or_forced():
  assert preprocess.channel_schemes(("CT",)) == ("ct",)
  assert preprocess.channel_schemes(("T1w", "ct", "FLAIR")) == ("mri", "ct", "mri")
  assert preprocess.channel_schemes(("CT", "PET"), "mri") == ("mri", "mri")
  assert preprocess.channel_schemes(("T2",), "ct") == ("ct",)
