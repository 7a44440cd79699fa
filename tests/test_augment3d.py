"""On-device 3D augmentation: identity at zero, flips and quarter turns as numpy makes them,
rotation and scaling as scipy makes them, labels kept in their set, one draw per key and
per example."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax.data import augment3d
from medseg_jax.errors import ConfigError

STRONG = augment3d.Ranges(rotation_degrees=(30.0, 30.0, 30.0), zoom=(0.7, 1.4),
                          flip_probability=0.5, intensity_scale=0.25, intensity_shift=0.1)


def _transform(angles=(0.0, 0.0, 0.0), zoom=1.0, flip=(False, False, False)):
  return augment3d.Transform(angles=jnp.array(angles, jnp.float32), zoom=jnp.float32(zoom),
                             flip=jnp.array(flip), scale=jnp.float32(1), offset=jnp.float32(0))


def _volumes(n=4, shape=(8, 10, 6), channels=2, seed=0):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n,) + shape + (channels,)).astype(np.float32)
  label = rng.choice(np.array([0, 2, 5], np.int32), size=(n,) + shape)
  return image, label


def _augment(ranges):
  return jax.jit(functools.partial(augment3d.augment_batch, ranges=ranges))


def test_identity_ranges_give_the_input_back_exactly():
  image, label = _volumes()
  out_image, out_label = _augment(augment3d.Ranges())(jax.random.key(1), image, label)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)


@pytest.mark.parametrize("flip", [(True, False, False), (False, True, True), (True, True, True)])
def test_a_flip_is_numpy_flip_and_its_own_inverse(flip):
  image, label = _volumes(n=1)
  apply = jax.jit(functools.partial(augment3d.apply, _transform(flip=flip)))
  once = apply(image[0], label[0])
  axes = tuple(a for a in range(3) if flip[a])
  np.testing.assert_array_equal(once[0], np.flip(image[0], axes))
  np.testing.assert_array_equal(once[1], np.flip(label[0], axes))
  twice = apply(*once)
  np.testing.assert_array_equal(twice[0], image[0])
  np.testing.assert_array_equal(twice[1], label[0])


@pytest.mark.parametrize("axis,plane", [(0, (1, 2)), (1, (0, 2)), (2, (0, 1))])
def test_a_quarter_turn_about_each_axis_is_numpy_rot90(axis, plane):
  image, label = _volumes(n=1, shape=(7, 7, 7))
  angles = [0.0, 0.0, 0.0]
  angles[axis] = np.pi / 2
  out_image, out_label = jax.jit(functools.partial(
      augment3d.apply, _transform(angles)))(image[0], label[0])
  np.testing.assert_array_equal(out_label, np.rot90(label[0], 1, axes=plane))
  np.testing.assert_allclose(out_image, np.rot90(image[0], 1, axes=plane), atol=1e-4)


def _numpy_rotation(angles):
  """R = R_W R_H R_D, each a rotation in the plane of the other two axes."""
  (cd, ch, cw), (sd, sh, sw) = np.cos(angles), np.sin(angles)
  about_d = np.array([[1, 0, 0], [0, cd, -sd], [0, sd, cd]])
  about_h = np.array([[ch, 0, -sh], [0, 1, 0], [sh, 0, ch]])
  about_w = np.array([[cw, -sw, 0], [sw, cw, 0], [0, 0, 1]])
  return about_w @ about_h @ about_d


def test_rotation_and_zoom_match_scipy_affine_transform():
  rng = np.random.default_rng(2)
  volume = ndimage.gaussian_filter(rng.normal(size=(12, 14, 10)), 2).astype(np.float32)
  label = (volume > 0).astype(np.int32) + (volume > 0.1)
  angles, zoom, flips = (0.3, -0.2, 0.5), 1.2, (False, True, False)
  t = _transform(angles=angles, zoom=zoom, flip=flips)
  got_image, got_label = jax.jit(functools.partial(augment3d.apply, t))(volume[..., None],
                                                                        label)
  # scipy: out[o] = in[matrix @ o + offset]; here in = c + F R^T (o - c) / zoom.
  matrix = np.diag(np.where(flips, -1.0, 1.0)) @ _numpy_rotation(np.array(angles)).T / zoom
  centre = (np.array(volume.shape) - 1) / 2
  offset = centre - matrix @ centre
  ref_image = ndimage.affine_transform(volume, matrix, offset, order=1, mode="grid-constant")
  ref_label = ndimage.affine_transform(label, matrix, offset, order=0, mode="grid-constant")
  np.testing.assert_allclose(got_image[..., 0], ref_image, atol=1e-4)
  assert np.mean(np.asarray(got_label) != ref_label) < 0.01  # ties at .5 may round apart


def test_labels_stay_in_their_set_and_move_with_the_image():
  label = np.zeros((6, 16, 16, 16), np.int32)
  label[:, 4:12, 5:11, 3:13] = 5
  label[:, 6:10, 7:9, 6:10] = 2
  image = (label[..., None] > 0).astype(np.float32) * 2.0 + 1.0
  out_image, out_label = map(np.asarray, _augment(STRONG)(jax.random.key(3), image, label))
  assert out_label.dtype == label.dtype and set(np.unique(out_label)) <= {0, 2, 5}
  for i in range(len(label)):
    bright = out_image[i, ..., 0] > 2.0  # halfway between inside (1) and the shape (3)
    truth = out_label[i] > 0
    assert (bright & truth).sum() / (bright | truth).sum() > 0.75, i


def test_reproducible_for_a_key_and_different_per_example_and_per_key():
  image, label = _volumes(n=1, shape=(8, 8, 8), channels=1)
  image, label = np.repeat(image, 4, axis=0), np.repeat(label, 4, axis=0)  # 4 equal examples
  fn = _augment(STRONG)
  first, again, other = (fn(jax.random.key(k), image, label) for k in (7, 7, 8))
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  out = np.asarray(first[0])
  assert len({out[i].tobytes() for i in range(4)}) == 4
  assert not np.array_equal(out, np.asarray(other[0]))


@pytest.mark.parametrize("field,value,key", [("rotation_degrees", (10.0, 10.0), "rotation"),
                                             ("rotation_degrees", (10.0, -1.0, 0.0), "rotation"),
                                             ("zoom", (1.2, 0.8), "zoom"),
                                             ("flip_probability", 1.5, "flip_probability"),
                                             ("intensity_shift", -0.1, "intensity_shift")])
def test_a_bad_range_is_one_config_error(field, value, key):
  with pytest.raises(ConfigError, match=f"data.augment.{key}"):
    augment3d.check(augment3d.Ranges(**{field: value}))
  augment3d.check(STRONG)
