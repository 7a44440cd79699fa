"""U-Net (Ronneberger et al. 2015) with 'same' padding so the output keeps the input size."""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class ConvBlock(nn.Module):
  """(3x3 conv -> optional norm -> ReLU) x 2."""

  features: int
  norm: str = "none"
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), padding="SAME", dtype=self.dtype)(x)
      x = make_norm(self.norm, self.features, self.axis_name, self.dtype, train)(x)
      x = nn.relu(x)
    return x


def make_norm(norm: str, features: int, axis_name: Optional[str], dtype, train: bool):
  """Returns the normalisation layer `norm` names (identity for 'none')."""
  if norm == "none":
    return lambda x: x
  if norm == "group":
    return nn.GroupNorm(num_groups=math.gcd(8, features), dtype=dtype)
  if norm == "batch":
    # axis_name makes the batch statistics global across data-parallel shards.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        axis_name=axis_name if train else None, dtype=dtype)
  raise ValueError(f"unknown norm {norm!r}")


@jax.custom_jvp
def max_pool_2x2(x):
  """2x2 max-pool, stride 2, as a reshape and a max: the values of nn.max_pool, whose
  gradient XLA's CPU backend builds from a scatter over index arrays.

  Its derivative (below) passes each window's tangent from one element, the window's
  first maximum, as nn.max_pool's does. JAX's own rule for a max would compare every
  element with the max and divide by the number of equal ones; XLA recomputes an
  element such as norm(x) + bias in each kernel that reads it and may round it
  differently in each (fused multiply-adds in one, not in another), so that count can
  be 0 while an element is still chosen, and the gradient is inf or NaN."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  b, h, w, c = x.shape
  windows = x.reshape(b, h // 2, 2, w // 2, 2, c)
  # The index of each window's first maximum, positions in row-major order (2 * row +
  # column): one integer, so no float is compared with another computed elsewhere.
  first = jnp.argmax(windows.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // 2, w // 2, c, 4),
                     axis=-1)
  position = (2 * jnp.arange(2)[:, None, None] + jnp.arange(2)).reshape(1, 1, 2, 1, 2, 1)
  chosen = position == first[:, :, None, :, None, :]
  tangent = jnp.where(chosen, t.reshape(windows.shape), 0).sum(axis=(2, 4))
  return windows.max(axis=(2, 4)), tangent


class UpConv2x2(nn.Module):
  """nn.ConvTranspose(features, (2, 2), strides=(2, 2)), with the same parameters, as one
  matrix product and a reshape: the windows do not overlap, so each input pixel fills its
  own 2x2 output block. XLA would otherwise convolve over an input dilated with zeros."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (2, 2, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    # nn.ConvTranspose ('SAME', kernel not flipped) puts kernel[1 - i] at output row 2r + i.
    kernel = kernel[::-1, ::-1].astype(self.dtype)
    y = jnp.einsum("bhwc,uvck->bhuwvk", x.astype(self.dtype), kernel)
    b, h, _, w, _, f = y.shape
    return y.reshape(b, 2 * h, 2 * w, f) + bias.astype(self.dtype)


class UNet(nn.Module):
  """Encoder of `depth` pooling levels, channels doubling from `base_features`."""

  num_classes: int
  depth: int = 4
  base_features: int = 64
  dropout: float = 0.0
  norm: str = "none"
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    block = dict(norm=self.norm, axis_name=self.axis_name, dtype=self.dtype)
    skips = []
    for level in range(self.depth):
      x = ConvBlock(self.base_features * 2**level, **block)(x, train)
      skips.append(x)
      x = max_pool_2x2(x)
    x = ConvBlock(self.base_features * 2**self.depth, **block)(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth)):
      features = self.base_features * 2**level
      # Named like Flax's nn.ConvTranspose, so parameter paths (checkpoints, fine-tuning
      # by path) are those of a standard transposed convolution.
      name = f"ConvTranspose_{self.depth - 1 - level}"
      x = UpConv2x2(features, dtype=self.dtype, name=name)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = ConvBlock(features, **block)(x, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
    return logits.astype(jnp.float32)
