"""U-Net (Ronneberger et al. 2015) with 'same' padding so the output keeps the input size."""

import math
from typing import Any, Optional

import flax.linen as nn
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
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = ConvBlock(self.base_features * 2**self.depth, **block)(x, train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth)):
      features = self.base_features * 2**level
      x = nn.ConvTranspose(features, (2, 2), strides=(2, 2), dtype=self.dtype)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = ConvBlock(features, **block)(x, train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
    return logits.astype(jnp.float32)
