"""Tversky loss: a Dice-like overlap loss that weighs false negatives and false positives
apart, for small structures where a missed voxel matters more than a spurious one.

Salehi, S. S. M., Erdogmus, D., Gholipour, A. "Tversky loss function for image
segmentation using 3D fully convolutional deep networks." MLMI workshop, MICCAI 2017.
arXiv:1706.05721.

Tversky index per class c: TP / (TP + alpha FP + beta FN), with soft counts from the
softmax; alpha = beta = 0.5 is the soft Dice. A loss component of medseg_jax (docs/components.md,
"Your own network, loss and plugins"): logits [B,H,W,C] and integer labels [B,H,W] to one
value per sample [B], so that any sharding of the batch gives the same mean.
"""

import jax
import jax.numpy as jnp

SMOOTH = 1.0  # keeps a class absent from both truth and prediction at index 1


def tversky_loss(logits: jax.Array, labels: jax.Array, alpha: float = 0.3,
                 beta: float = 0.7) -> jax.Array:
  """1 - the Tversky index averaged over the foreground classes, per sample: -> [B].
  alpha = 0.3, beta = 0.7 are the paper's best settings on its lesion data."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)[..., 1:]
  axes = (1, 2)
  true_positive = jnp.sum(probs * onehot, axis=axes)
  false_positive = jnp.sum(probs * (1.0 - onehot), axis=axes)
  false_negative = jnp.sum((1.0 - probs) * onehot, axis=axes)
  index = (true_positive + SMOOTH) / (true_positive + alpha * false_positive
                                      + beta * false_negative + SMOOTH)
  return 1.0 - jnp.mean(index, axis=-1)


def tversky_ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Tversky plus pixel-wise cross-entropy, per sample (as dice_ce pairs Dice with it)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return tversky_loss(logits, labels) + jnp.mean(nll, axis=(1, 2))
