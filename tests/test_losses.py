"""Losses: shard-invariant, zero for a perfect prediction, finite on empty masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medseg_jax.training import losses


def _data(seed=0, batch=8, classes=3, size=16):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, size, size, classes)).astype(np.float32)
  labels = rng.integers(0, classes, size=(batch, size, size)).astype(np.int32)
  return logits, labels


def _numpy_dice_loss(logits, labels):
  """Independent reference: soft Dice per sample and class, smooth 1."""
  e = np.exp(logits - logits.max(-1, keepdims=True))
  p = e / e.sum(-1, keepdims=True)
  out = []
  for b in range(len(labels)):
    dices = []
    for c in range(logits.shape[-1]):
      g = (labels[b] == c).astype(np.float64)
      dices.append((2 * (p[b, ..., c] * g).sum() + 1) / (p[b, ..., c].sum() + g.sum() + 1))
    out.append(1 - np.mean(dices))
  return np.array(out)


def test_dice_matches_numpy_reference():
  logits, labels = _data()
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels),
                             _numpy_dice_loss(logits, labels), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_loss_is_invariant_to_the_number_of_shards(devices8, name):
  """The mean of equal shard means is the global mean, whatever the shard count."""
  logits, labels = _data(batch=16)
  fn = losses.LOSSES[name]
  whole = float(jnp.mean(fn(logits, labels)))
  for shards in (2, 4, 8):
    parts = [float(jnp.mean(fn(l, y))) for l, y in
             zip(np.split(logits, shards), np.split(labels, shards))]
    assert np.mean(parts) == pytest.approx(whole, rel=1e-5)


def test_loss_value_on_8_devices_equals_one_device(devices8):
  from medseg_jax.parallel import strategies
  logits, labels = _data(batch=16)
  par = strategies.make_parallel("shard_map", 8)
  sharded = jax.shard_map(lambda l, y: jax.lax.pmean(jnp.mean(losses.dice_ce_loss(l, y)), "data"),
                          mesh=par.mesh, in_specs=(jax.P("data"), jax.P("data")),
                          out_specs=jax.P())
  whole = jnp.mean(losses.dice_ce_loss(logits, labels))
  np.testing.assert_allclose(jax.jit(sharded)(logits, labels), whole, rtol=1e-5)


def test_perfect_prediction_has_zero_dice_loss():
  _, labels = _data()
  logits = 50.0 * jax.nn.one_hot(labels, 3)
  assert float(jnp.max(losses.soft_dice_loss(logits, labels))) < 1e-3


def test_empty_masks_give_finite_losses_and_gradients():
  labels = np.zeros((2, 16, 16), np.int32)  # background only: classes 1, 2 are empty
  logits = np.zeros((2, 16, 16, 3), np.float32)
  for fn in losses.LOSSES.values():
    value, grad = jax.value_and_grad(lambda l: jnp.mean(fn(l, labels)))(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  confident = 50.0 * jax.nn.one_hot(labels, 3)
  assert float(jnp.max(losses.soft_dice_loss(confident, labels))) < 1e-3


def _numpy_cross_entropy(logits, labels):
  """Independent reference: mean negative log-likelihood per sample."""
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, labels[..., None], -1)[..., 0]
  return picked.reshape(len(labels), -1).mean(1) * -1


def test_3d_losses_are_per_sample_over_every_voxel():
  """Patches [B,D,H,W,C]: one value per patch over all its voxels, as the references."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 6, 5, 7, 3)).astype(np.float32)
  labels = rng.integers(0, 3, size=(4, 6, 5, 7)).astype(np.int32)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels),
                             _numpy_dice_loss(logits, labels), rtol=1e-5)
  np.testing.assert_allclose(losses.cross_entropy_loss(logits, labels),
                             _numpy_cross_entropy(logits, labels), rtol=1e-5)
  losses.check_loss("dice_ce", 3, dims=3)
