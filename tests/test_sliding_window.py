"""Sliding-window inference: windows, Gaussian weights, batching and mirroring, checked
against an identity network and against sums written out by hand."""

import itertools

import numpy as np
import pytest

from medseg_jax.errors import ConfigError
from medseg_jax.evaluation import sliding_window

PATCH = (4, 6, 5)


def _identity(windows):
  return windows


def _volume(shape, channels=2, seed=0):
  return np.random.default_rng(seed).normal(size=tuple(shape) + (channels,)).astype(np.float32)


@pytest.mark.parametrize("shape", [(4, 6, 5), (8, 12, 10), (9, 13, 7), (11, 7, 23),
                                   (2, 3, 1), (3, 20, 4), (1, 1, 1)])
@pytest.mark.parametrize("mirror", [False, True])
def test_an_identity_network_gives_back_the_input_exactly(shape, mirror):
  volume = _volume(shape)
  got = sliding_window.sliding_window(volume, _identity, PATCH, overlap=0.5, batch=3,
                                      mirror=mirror)
  assert got.dtype == np.float32 and got.shape == volume.shape
  np.testing.assert_array_equal(got, volume)


@pytest.mark.parametrize("size,patch,overlap,starts", [
    (10, 4, 0.5, [0, 2, 4, 6]),
    (11, 4, 0.5, [0, 2, 4, 6, 7]),
    (10, 4, 0.0, [0, 4, 6]),
    (12, 4, 0.0, [0, 4, 8]),
    (4, 4, 0.5, [0]),
    (3, 4, 0.5, [0]),
    (10, 5, 0.5, [0, 2, 4, 5]),    # step floor(2.5) = 2
    (20, 8, 0.75, [0, 2, 4, 6, 8, 10, 12]),
    (9, 8, 0.5, [0, 1]),
    (10, 3, 0.7, [0, 1, 2, 3, 4, 5, 6, 7]),  # step floor(0.9) -> 1
])
def test_window_starts_match_a_hand_count(size, patch, overlap, starts):
  assert sliding_window.window_starts(size, patch, overlap) == starts


def test_window_corners_cover_every_axis():
  corners = sliding_window.window_corners((10, 3, 11), (4, 4, 4), 0.5)
  assert len(corners) == 4 * 1 * 5
  assert corners[0] == (0, 0, 0) and corners[-1] == (6, 0, 7)


@pytest.mark.parametrize("patch", [(4, 6, 5), (1, 7, 8), (9, 2, 3)])
def test_the_gaussian_map_is_symmetric_and_positive(patch):
  weights = sliding_window.gaussian_map(patch, 0.125)
  assert weights.shape == patch and np.all(weights > 0) and weights.max() == 1.0
  for axis in range(3):
    np.testing.assert_array_equal(weights, np.flip(weights, axis))
  assert weights.min() >= sliding_window.MIN_WEIGHT
  # Away from the floor it is the product of the three 1D Gaussians (sigma = patch / 8).
  centre = [(n - 1) / 2 for n in patch]
  d, h, w = 0, patch[1] // 2, patch[2] // 2
  want = np.exp(-sum((i - c)**2 / (2 * (n / 8)**2) for i, c, n in zip((d, h, w), centre,
                                                                    patch)))
  want /= np.exp(-sum(((n + 1) % 2 * 0.5)**2 / (2 * (n / 8)**2) for n in patch))
  np.testing.assert_allclose(weights[d, h, w], max(want, 1e-3), rtol=1e-12)


def test_the_floor_keeps_tiny_sigmas_safe():
  weights = sliding_window.gaussian_map((8, 8, 8), 0.01)
  assert weights.min() == sliding_window.MIN_WEIGHT
  got = sliding_window.sliding_window(_volume((13, 13, 13), 1), _identity, (8, 8, 8),
                                      gaussian_sigma=0.01)
  assert np.all(np.isfinite(got))


def _position_network(windows):
  """Probabilities that depend on the position in the window and on the input, so the
  windows disagree where they overlap and the weighting shows."""
  n, d, h, w, _ = windows.shape
  ramp = np.add.outer(np.add.outer(np.arange(d), 2 * np.arange(h)), 3 * np.arange(w))
  first = 1 / (1 + np.exp(-(windows[..., 0] + ramp / 10)))
  return np.stack([first, 1 - first], -1).astype(np.float32)


def test_windows_are_weighted_as_written_out_by_hand():
  volume = _volume((6, 6, 9), 1, seed=3)
  patch = (4, 6, 5)
  got = sliding_window.sliding_window(volume, _position_network, patch, overlap=0.5)
  # Reference: starts by hand (D: 0, 2; H: 0; W: 0, 2, 4), a Gaussian by hand, and the
  # weighted mean of every window covering each voxel.
  gauss = [np.exp(-(np.arange(n) - (n - 1) / 2)**2 / (2 * (n / 8)**2)) for n in patch]
  weight = np.maximum(np.einsum("i,j,k->ijk", *gauss) / np.prod([g.max() for g in gauss]),
                      1e-3)
  total = np.zeros((6, 6, 9, 2))
  norm = np.zeros((6, 6, 9))
  for a, c in itertools.product((0, 2), (0, 2, 4)):
    window = volume[None, a:a + 4, :, c:c + 5]
    total[a:a + 4, :, c:c + 5] += weight[..., None] * _position_network(window)[0]
    norm[a:a + 4, :, c:c + 5] += weight
  np.testing.assert_allclose(got, total / norm[..., None], rtol=1e-6)


def test_mirroring_is_the_mean_over_the_eight_flips():
  volume = _volume(PATCH, 1, seed=4)  # one window, so the weights cancel
  got = sliding_window.sliding_window(volume, _position_network, PATCH, mirror=True)
  want = np.zeros(PATCH + (2,))
  for r in range(4):
    for axes in itertools.combinations((0, 1, 2), r):
      flipped = np.flip(volume, axes)[None]
      want += np.flip(_position_network(flipped)[0], axes)
  np.testing.assert_allclose(got, want / 8, rtol=1e-6)
  plain = sliding_window.sliding_window(volume, _position_network, PATCH)
  assert np.abs(got - plain).max() > 1e-3  # the network is not flip-invariant


@pytest.mark.parametrize("mirror", [False, True])
def test_the_batch_size_does_not_change_the_result(mirror):
  volume = _volume((9, 13, 11), 1, seed=5)
  results = [sliding_window.sliding_window(volume, _position_network, PATCH, batch=b,
                                           mirror=mirror) for b in (1, 4, 7)]
  np.testing.assert_array_equal(results[0], results[1])
  np.testing.assert_array_equal(results[0], results[2])


def test_run_sees_full_batches_and_the_padding_is_dropped():
  seen = []

  def run(windows):
    seen.append(windows.shape)
    return windows

  volume = _volume((8, 6, 5), 1)  # windows along D at 0, 2, 4: three
  got = sliding_window.sliding_window(volume, run, PATCH, batch=2)
  assert seen == [(2, 4, 6, 5, 1)] * 2
  np.testing.assert_array_equal(got, volume)


def test_run_returning_the_wrong_shape_is_reported():
  with pytest.raises(ValueError, match="run returned"):
    sliding_window.sliding_window(_volume(PATCH), lambda w: w[:, :2], PATCH)


@pytest.mark.parametrize("overlap,sigma,key", [(1.0, 0.125, "evaluation.window_overlap"),
                                               (-0.1, 0.125, "evaluation.window_overlap"),
                                               (0.5, 0.0, "evaluation.gaussian_sigma")])
def test_bad_settings_name_their_key(overlap, sigma, key):
  with pytest.raises(ConfigError, match=key):
    sliding_window.check_settings(overlap, sigma)


def test_a_volume_smaller_than_the_patch_is_centred_in_its_window():
  volume = _volume((2, 6, 2), 1, seed=6)  # short along D (by 2) and W (by 3)
  got = sliding_window.sliding_window(volume, _position_network, PATCH, pad_value=0.0)
  # Reference: pad by hand (1 before and 1 after along D, 1 and 2 along W), run, crop.
  window = np.pad(volume, ((1, 1), (0, 0), (1, 2), (0, 0)))[None]
  np.testing.assert_allclose(got, _position_network(window)[0, 1:3, :, 1:3], rtol=1e-6)
