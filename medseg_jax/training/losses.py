"""Segmentation losses, computed per sample so that any sharding of a batch gives the same value.

Every loss returns one value per sample; the caller averages over the global
batch (a mean of equal-size shard means is the global mean).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from medseg_jax.errors import ConfigError

DICE_SMOOTH = 1.0  # keeps empty classes finite: empty truth + empty prediction -> Dice 1


def soft_dice_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1 - soft Dice averaged over classes, per sample: [B,H,W,C], [B,H,W] -> [B]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  axes = (1, 2)
  intersection = jnp.sum(probs * onehot, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
  return 1.0 - jnp.mean(dice, axis=-1)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Pixel-wise softmax cross-entropy averaged over pixels, per sample: -> [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.mean(nll, axis=(1, 2))


def dice_ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return soft_dice_loss(logits, labels) + cross_entropy_loss(logits, labels)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "dice": soft_dice_loss,
    "ce": cross_entropy_loss,
    "dice_ce": dice_ce_loss,
}


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  if name not in LOSSES:
    raise ConfigError(f"train.loss={name!r}: unknown loss, choose from {sorted(LOSSES)}")
  return LOSSES[name]
