"""Segmentation losses, computed per sample so that any sharding of a batch gives the same value.

Every loss, built-in or the user's own (`train.loss=module:name` or `file.py:name`), maps
logits [B,H,W,C] and integer labels [B,H,W] (in 3D, [B,D,H,W,C] and [B,D,H,W]) to one value
per sample [B]; the caller averages over the global batch. Per sample because that is exact
under any sharding: a mean of equal-size shard means is the global mean, whereas a loss over
a whole batch (a batch Dice, say) changes with the number of devices the batch is split over.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from medseg_jax import components
from medseg_jax.data import targets
from medseg_jax.errors import first_line

DICE_SMOOTH = 1.0  # keeps empty classes finite: empty truth + empty prediction -> Dice 1


def _spatial_axes(logits: jax.Array) -> tuple:
  """The axes between the batch and the classes: (H, W) in 2D, (D, H, W) in 3D."""
  return tuple(range(1, logits.ndim - 1))


def soft_dice_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """1 - soft Dice averaged over classes, per sample: [B,...,C], [B,...] -> [B]."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return _one_minus_soft_dice(probs, onehot, _spatial_axes(logits))


def _one_minus_soft_dice(probs: jax.Array, truth: jax.Array, axes: tuple) -> jax.Array:
  """1 - the soft Dice of each channel of `probs` against `truth` over `axes`, averaged
  over the channels: [B,...,K] -> [B]."""
  intersection = jnp.sum(probs * truth, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(truth, axis=axes)
  dice = (2.0 * intersection + DICE_SMOOTH) / (total + DICE_SMOOTH)
  return 1.0 - jnp.mean(dice, axis=-1)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Pixel-wise softmax cross-entropy averaged over pixels, per sample: -> [B]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  return jnp.mean(nll, axis=_spatial_axes(logits))


def dice_ce_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return soft_dice_loss(logits, labels) + cross_entropy_loss(logits, labels)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "dice": soft_dice_loss,
    "ce": cross_entropy_loss,
    "dice_ce": dice_ce_loss,
}


def sigmoid_dice_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """1 - soft Dice of each region's sigmoid against its membership mask, averaged over
  regions, per sample: logits and masks [B,...,R] -> [B]."""
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))
  return _one_minus_soft_dice(probs, masks, _spatial_axes(logits))


def binary_cross_entropy_loss(logits: jax.Array, masks: jax.Array) -> jax.Array:
  """Each region's sigmoid cross-entropy averaged over pixels and regions, per sample."""
  bce = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), masks)
  return jnp.mean(bce, axis=(*_spatial_axes(logits), logits.ndim - 1))


# The built-in losses of region-based training (`data.regions`), by the same names: what
# nnU-Net trains regions with (Dice and binary cross-entropy of sigmoid outputs).
REGION_LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "dice": sigmoid_dice_loss,
    "ce": binary_cross_entropy_loss,
    "dice_ce": lambda logits, masks: (sigmoid_dice_loss(logits, masks)
                                      + binary_cross_entropy_loss(logits, masks)),
}


def for_outputs(component: components.Component, outputs: targets.Classes | targets.Regions
                ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The loss to train `outputs` with: with regions, a built-in name means its region
  form, fed the regions' membership masks; a user's own loss always gets the labels."""
  region_loss = REGION_LOSSES.get(component.spec) if component.source is None else None
  if not isinstance(outputs, targets.Regions) or region_loss is None:
    return component.obj
  return lambda logits, labels: region_loss(logits, outputs.masks(labels, jnp))


def loss_component(spec: str) -> components.Component:
  """The loss `train.loss` names: a built-in or a user's per-sample loss function."""
  component = components.resolve("train.loss", spec, LOSSES)
  if not callable(component.obj):
    raise component.error(f"{component.name} is not a function (logits, labels) -> [B]")
  return component


def get_loss(spec: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  return loss_component(spec).obj


def check_loss(spec: str, num_classes: int, dims: int = 2) -> None:
  """Raises a ConfigError unless the loss maps logits [2,8,8,C] and labels [2,8,8] to [2]
  (for examples of 3 spatial `dims`: [2,8,8,8,C] and [2,8,8,8])."""
  component = loss_component(spec)
  spatial = (2,) + (8,) * dims
  logits = jax.ShapeDtypeStruct(spatial + (num_classes,), jnp.float32)
  labels = jax.ShapeDtypeStruct(spatial, jnp.int32)
  shown = ",".join(map(str, spatial))
  try:
    out = jax.eval_shape(component.obj, logits, labels)
  except Exception as e:  # pylint: disable=broad-except  (the user's code may raise anything)
    raise component.error(f"fails on logits [{shown},{num_classes}] and labels [{shown}]: "
                          f"{type(e).__name__}: {first_line(e)}") from e
  if getattr(out, "shape", None) != (2,):
    raise component.error(f"returns {getattr(out, 'shape', type(out).__name__)} for a batch "
                          "of 2; a loss per sample, [2], expected")
