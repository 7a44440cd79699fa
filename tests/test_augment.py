"""On-device augmentation: identity at zero, image and label moved together, as scipy does it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from medseg_jax import defaults
from medseg_jax.training import losses, step
from medseg_jax.data import augment
from medseg_jax.errors import ConfigError
from medseg_jax.parallel import strategies

THESIS = augment.Ranges(rotation_degrees=45.0, zoom=(0.8, 1.2), translate_pixels=6.4,
                        flip_probability=0.5)
SIZE = 32


def _square_batch(n=8):
  """A bright off-centre rectangle in the image and the same rectangle as class 1."""
  label = np.zeros((n, SIZE, SIZE), np.int32)
  label[:, 6:14, 9:22] = 1
  image = label[..., None].astype(np.float32) * 2.0 + 1.0
  return image, label


def test_zero_ranges_are_the_identity():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(4, SIZE, SIZE, 2)).astype(np.float32)
  label = rng.integers(0, 3, (4, SIZE, SIZE)).astype(np.int32)
  out_image, out_label = jax.jit(functools.partial(augment.augment_batch,
                                                   ranges=augment.Ranges()))(
      jax.random.key(1), image, label)
  np.testing.assert_array_equal(out_image, image)
  np.testing.assert_array_equal(out_label, label)


def test_image_and_label_move_together():
  image, label = _square_batch()
  fn = jax.jit(functools.partial(augment.augment_batch, ranges=THESIS))
  out_image, out_label = map(np.asarray, fn(jax.random.key(3), image, label))
  moved = 0
  for i in range(len(image)):
    shape_in_image = out_image[i, ..., 0] > 2.0  # halfway between 1 (inside) and 3 (shape)
    truth = out_label[i] == 1
    iou = (shape_in_image & truth).sum() / (shape_in_image | truth).sum()
    assert iou > 0.9, (i, iou)
    moved += not np.array_equal(out_label[i], label[i])
  assert moved == len(image)
  assert len({out_label[i].tobytes() for i in range(len(image))}) == len(image)
  again = fn(jax.random.key(3), image, label)  # the same key, the same batch
  np.testing.assert_array_equal(again[0], out_image)


def test_matches_scipy_affine_transform():
  rng = np.random.default_rng(2)
  image = ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 2).astype(np.float32)
  label = (image > 0).astype(np.int32) + (image > 0.1)
  for seed in range(4):
    t = augment.sample(jax.random.key(seed), THESIS)
    got_image, got_label = augment.apply(t, jnp.asarray(image[..., None]), jnp.asarray(label))
    # Reference: output pixel o reads input M o + offset, M = F R(-angle) / zoom.
    angle, zoom = float(t.angle), float(t.zoom)
    flips = np.where(np.asarray(t.flip), -1.0, 1.0)
    rotation = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    matrix = np.diag(flips) @ rotation / zoom
    centre = np.full(2, (SIZE - 1) / 2)
    offset = centre - matrix @ (centre + np.asarray(t.shift))
    ref_image = ndimage.affine_transform(image, matrix, offset, order=1, mode="grid-constant")
    ref_label = ndimage.affine_transform(label, matrix, offset, order=0, mode="grid-constant")
    np.testing.assert_allclose(got_image[..., 0], ref_image, atol=1e-4)
    assert np.mean(np.asarray(got_label) != ref_label) < 0.01  # ties at .5 may round apart


def _augmented_as_promised(strategy, fn, image, label, rng):
  """The batch a first train step augments, from the keys it documents: the step (0) folded
  into the rng, then split once; per shard, the shard's index folded in before that (under
  gspmd the step sees the whole batch, so each example's key follows its index)."""
  keyed = jax.jit(lambda key, images, labels: fn(
      jax.random.split(jax.random.fold_in(key, 0))[1], images, labels))
  if strategy == "gspmd":
    return keyed(rng, image, label)
  shards = zip(np.split(image, 8), np.split(label, 8))
  parts = [keyed(jax.random.fold_in(rng, i), *shard) for i, shard in enumerate(shards)]
  return tuple(np.concatenate(x) for x in zip(*parts))


@pytest.mark.parametrize("strategy", strategies.STRATEGIES)
def test_every_shard_augments_differently(devices8, strategy):
  """Eight copies of one slice, one per device: the train step's loss is that of one device
  on eight different transforms, the ones its keys promise."""
  from test_parallel import _reference_step, _state  # pylint: disable=import-outside-toplevel
  image, label = _square_batch(8)
  fn = functools.partial(augment.augment_batch, ranges=THESIS)
  ref_image, ref_label = _augmented_as_promised(strategy, fn, image, label, jax.random.key(0))
  assert len({np.asarray(ref_label[i]).tobytes() for i in range(8)}) == 8
  _, ref_metrics = _reference_step(_state(), {"image": ref_image, "label": ref_label})
  par = strategies.make_parallel(strategy, 8)
  _, metrics = par.train_step(functools.partial(step.train_step, loss_fn=losses.dice_ce_loss,
                                                augment=fn))(
      par.put_state(_state()), par.put_batch({"image": image, "label": label}),
      jax.random.key(0))
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)


def test_train_step_augments_only_when_asked(devices8):
  from test_parallel import _batch, _state  # pylint: disable=import-outside-toplevel
  batch = _batch(seed=4)
  par = strategies.make_parallel("shard_map", 8)
  # Two levels: on a noise batch with random labels the one-level U-Net's loss barely
  # moves under augmentation, the two-level one's by well over the tolerance below.
  loss = lambda aug: float(jax.device_get(par.train_step(
      functools.partial(step.train_step, loss_fn=losses.dice_ce_loss, augment=aug))(
      par.put_state(_state(depth=2)), par.put_batch(batch), jax.random.key(0))[1]["loss"]))
  plain = loss(None)
  identity = functools.partial(augment.augment_batch, ranges=augment.Ranges())
  assert loss(identity) == pytest.approx(plain, rel=1e-6)
  assert loss(functools.partial(augment.augment_batch, ranges=THESIS)) != pytest.approx(
      plain, rel=1e-3)


def test_a_slice_drawn_twice_in_one_epoch_is_augmented_differently(devices8):
  """With data.augment.samples_per_epoch a slice comes back in the same epoch; the step's
  rng is folded with the step, so the same slice at the same place of a later step's
  batch gets another transform: the same parameters give another loss."""
  from medseg_jax.data import loader  # pylint: disable=import-outside-toplevel
  from test_parallel import _state  # pylint: disable=import-outside-toplevel
  order = loader.epoch_order(32, seed=0, epoch=0, draws=96)  # 3 draws of each of 32 slices
  draws = np.flatnonzero(order == order[0])
  assert len(draws) == 3
  first, second = (int(p) // 8 for p in draws[:2])  # their steps at a global batch of 8
  assert first != second
  image, label = _square_batch(8)  # the slice on every device
  par = strategies.make_parallel("shard_map", 8)
  step_fn = par.train_step(functools.partial(
      step.train_step, loss_fn=losses.dice_ce_loss,
      augment=functools.partial(augment.augment_batch, ranges=THESIS)))
  loss = lambda at: float(jax.device_get(step_fn(
      par.put_state(_state().replace(step=jnp.asarray(at, jnp.int32))),
      par.put_batch({"image": image, "label": label}), jax.random.key(0))[1]["loss"]))
  assert loss(first) == loss(first)  # nothing else differs between two calls
  assert loss(second) != pytest.approx(loss(first), rel=1e-4)


def test_config_section():
  cfg = defaults.get_config()
  assert augment.ranges_from_config(cfg.data.augment) is None  # off by default
  cfg.data.augment.enabled = True
  assert isinstance(augment.ranges_from_config(cfg.data.augment), augment.Ranges)
  cfg.data.augment.zoom = (1.2, 0.8)
  with pytest.raises(ConfigError, match="data.augment.zoom"):
    augment.ranges_from_config(cfg.data.augment)
