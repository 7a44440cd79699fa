"""3D U-Net (Çiçek et al. 2016) on patches [B,D,H,W,C], with a normalisation per example.

The network of `model.name="unet3d"`; `model.depth`, `model.base_features`, `model.norm`
("instance" | "group" | "none") and `model.dropout` set it, and `data.patch_size` (D,H,W)
must be a multiple of 2**depth along every axis. Batch normalisation is not offered: at
the per-device batch of 1-2 patches a 3D network trains with, batch statistics are noise,
and an example's output would depend on the others in its batch. Instance and group
normalisation compute their statistics per example (in float32, also under a bfloat16
compute dtype), so an example's logits do not depend on the rest of the batch.

The 3x3x3 convolutions go through `conv3d_cpu.conv_general_dilated`, which is XLA's own
convolution except on the CPU backend, for the shapes where its kernel gradient measured
slower than matrix products over shifted inputs (benchmarks/conv3d_cpu.py); the parameters
are those of `nn.Conv` either way.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Not `from medseg_jax.models import conv3d_cpu`: that reads the models package, whose
# __init__ imports this module.
import medseg_jax.models.conv3d_cpu as conv3d_cpu
from medseg_jax.errors import ConfigError

NORMS = ("instance", "group", "none")
NEGATIVE_SLOPE = 0.01  # leaky ReLU, as nnU-Net's 3D U-Net


def make_norm(norm: str, features: int, dtype: Any):
  """The per-example normalisation `norm` names (identity for 'none')."""
  if norm == "instance":
    return nn.InstanceNorm(dtype=dtype)
  if norm == "group":
    return nn.GroupNorm(num_groups=math.gcd(8, features), dtype=dtype)
  if norm == "none":
    return lambda x: x
  raise ConfigError(f"model.norm={norm!r}: unet3d needs one of {list(NORMS)}")


class ConvBlock3D(nn.Module):
  """(3x3x3 conv -> norm -> leaky ReLU) x 2."""

  features: int
  norm: str = "instance"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(2):
      # Named as nn.Conv names itself, so parameter paths are those of a plain nn.Conv.
      x = nn.Conv(self.features, (3, 3, 3), padding="SAME", dtype=self.dtype,
                  conv_general_dilated=conv3d_cpu.conv_general_dilated, name=f"Conv_{i}")(x)
      x = make_norm(self.norm, self.features, self.dtype)(x)
      x = nn.leaky_relu(x, NEGATIVE_SLOPE)
    return x


@jax.custom_jvp
def max_pool_2x2x2(x):
  """2x2x2 max-pool, stride 2, as a reshape and a max, with the derivative through each
  window's first maximum (see unet.max_pool_2x2 for why: JAX's rule for a max divides by
  a count of equal elements that XLA's rounding in two kernels can make 0, or make differ
  between two compilations of the same step)."""
  b, d, h, w, c = x.shape
  return x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).max(axis=(2, 4, 6))


@max_pool_2x2x2.defjvp
def _max_pool_2x2x2_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  b, d, h, w, c = x.shape
  windows = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
  # The index of each window's first maximum in row-major order (4 * d + 2 * h + w).
  first = jnp.argmax(windows.transpose(0, 1, 3, 5, 7, 2, 4, 6)
                     .reshape(b, d // 2, h // 2, w // 2, c, 8), axis=-1)
  two = jnp.arange(2)
  position = (4 * two[:, None, None] + 2 * two[None, :, None] + two[None, None, :])
  position = position.reshape(1, 1, 2, 1, 2, 1, 2, 1)
  chosen = position == first[:, :, None, :, None, :, None, :]
  tangent = jnp.where(chosen, t.reshape(windows.shape), 0).sum(axis=(2, 4, 6))
  return windows.max(axis=(2, 4, 6)), tangent


class UpConv2x2x2(nn.Module):
  """nn.ConvTranspose(features, (2, 2, 2), strides=(2, 2, 2)) with the same parameters, as
  one matrix product and a reshape: the windows do not overlap, so each input voxel fills
  its own 2x2x2 output block (XLA would convolve over an input dilated with zeros)."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (2, 2, 2, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    # nn.ConvTranspose ('SAME', kernel not flipped) puts kernel[1 - i] at output 2r + i.
    kernel = kernel[::-1, ::-1, ::-1].astype(self.dtype)
    y = jnp.einsum("bdhwc,stuck->bdshtwuk", x.astype(self.dtype), kernel)
    b, d, _, h, _, w, _, f = y.shape
    return y.reshape(b, 2 * d, 2 * h, 2 * w, f) + bias.astype(self.dtype)


def check_patch_size(shape: Sequence[int], depth: int) -> None:
  """Raises a ConfigError unless every spatial size of x [B,D,H,W,C] is a positive
  multiple of 2**depth (each pooling level halves it exactly)."""
  if len(shape) != 5:
    raise ConfigError(f"unet3d takes x [B,D,H,W,C]; got shape {tuple(shape)}")
  factor = 2**depth
  spatial = tuple(int(s) for s in shape[1:4])
  if any(s <= 0 or s % factor for s in spatial):
    raise ConfigError(f"data.patch_size={spatial}: unet3d with model.depth={depth} needs "
                      f"every size a multiple of {factor}")


class UNet3D(nn.Module):
  """Encoder of `depth` pooling levels, channels doubling from `base_features`; logits
  [B,D,H,W,num_classes] in float32, computed in `dtype` with float32 parameters.

  `axis_name` is accepted for the network contract and unused: nothing here is
  synchronised across devices (the normalisation is per example)."""

  num_classes: int
  depth: int = 3
  base_features: int = 16
  norm: str = "instance"
  dropout: float = 0.0
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_patch_size(x.shape, self.depth)
    x = x.astype(self.dtype)
    block = dict(norm=self.norm, dtype=self.dtype)
    skips = []
    for level in range(self.depth):
      x = ConvBlock3D(self.base_features * 2**level, **block)(x)
      skips.append(x)
      x = max_pool_2x2x2(x)
    x = ConvBlock3D(self.base_features * 2**self.depth, **block)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth)):
      features = self.base_features * 2**level
      name = f"ConvTranspose_{self.depth - 1 - level}"  # as Flax names nn.ConvTranspose
      x = UpConv2x2x2(features, dtype=self.dtype, name=name)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = ConvBlock3D(features, **block)(x)
    logits = nn.Conv(self.num_classes, (1, 1, 1), dtype=self.dtype)(x)
    return logits.astype(jnp.float32)
