"""3D U-Net (Çiçek et al. 2016) on patches [B,D,H,W,C], with a normalisation per example.

The network of `model.name="unet3d"`; `model.depth`, `model.base_features`,
`model.max_features`, `model.pooling`, `model.norm` ("instance" | "group" | "none") and
`model.dropout` set it, and `data.patch_size` (D,H,W) must be a multiple of the product of
its axis's pooling factors (2**depth when every level pools every axis): an anisotropic
patch pools its coarse axis at fewer levels, as nnU-Net's. Batch normalisation is not offered: at
the per-device batch of 1-2 patches a 3D network trains with, batch statistics are noise,
and an example's output would depend on the others in its batch. Instance and group
normalisation compute their statistics per example (in float32, also under a bfloat16
compute dtype), so an example's logits do not depend on the rest of the batch.

The 3x3x3 convolutions go through `conv3d_cpu.conv_general_dilated`, which is XLA's own
convolution except on the CPU backend, for the shapes where its kernel gradient measured
slower than matrix products over shifted inputs (benchmarks/conv3d_cpu.py); the parameters
are those of `nn.Conv` either way.
"""

import functools
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def max_pool(x, factors=(2, 2, 2)):
  """Max-pool of x [B,D,H,W,C] by `factors` (D,H,W) with stride equal to the window, as a
  reshape and a max, with the derivative through each window's first maximum (see
  unet.max_pool_2x2 for why: JAX's rule for a max divides by a count of equal elements
  that XLA's rounding in two kernels can make 0, or make differ between two compilations
  of the same step)."""
  return _windows(x, factors).max(axis=(2, 4, 6))


def _windows(x, factors):
  b, d, h, w, c = x.shape
  fd, fh, fw = factors
  return x.reshape(b, d // fd, fd, h // fh, fh, w // fw, fw, c)


@max_pool.defjvp
def _max_pool_jvp(factors, primals, tangents):
  (x,), (t,) = primals, tangents
  windows = _windows(x, factors)
  b, d, _, h, _, w, _, c = windows.shape
  size = math.prod(factors)
  # The index of each window's first maximum in row-major order over (D, H, W).
  first = jnp.argmax(windows.transpose(0, 1, 3, 5, 7, 2, 4, 6)
                     .reshape(b, d, h, w, c, size), axis=-1)
  position = jnp.arange(size).reshape(1, 1, factors[0], 1, factors[1], 1, factors[2], 1)
  chosen = position == first[:, :, None, :, None, :, None, :]
  tangent = jnp.where(chosen, _windows(t, factors), 0).sum(axis=(2, 4, 6))
  return windows.max(axis=(2, 4, 6)), tangent


class UpConv(nn.Module):
  """nn.ConvTranspose(features, factors, strides=factors) with the same parameters, as one
  matrix product and a reshape: the windows do not overlap, so each input voxel fills its
  own output block (XLA would convolve over an input dilated with zeros)."""

  features: int
  factors: tuple[int, int, int] = (2, 2, 2)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.factors, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    # nn.ConvTranspose ('SAME', kernel not flipped) puts kernel[f - 1 - i] at output f r + i.
    kernel = kernel[::-1, ::-1, ::-1].astype(self.dtype)
    y = jnp.einsum("bdhwc,stuck->bdshtwuk", x.astype(self.dtype), kernel)
    b, d, fd, h, fh, w, fw, f = y.shape
    return y.reshape(b, d * fd, h * fh, w * fw, f) + bias.astype(self.dtype)


def pooling_factors(depth: int, pooling: Sequence[Sequence[int]] = ()) -> tuple:
  """Each level's (D,H,W) pooling factors: `pooling` checked (depth levels of 1 or 2, each
  level pooling some axis), or 2 along every axis at every level when it is empty."""
  if not pooling:
    return ((2, 2, 2),) * depth
  levels = tuple(tuple(int(f) for f in level) for level in pooling)
  if len(levels) != depth:
    raise ConfigError(f"model.pooling has {len(levels)} levels; model.depth={depth} needs "
                      f"as many")
  if any(len(level) != 3 or set(level) - {1, 2} or level == (1, 1, 1) for level in levels):
    raise ConfigError(f"model.pooling={levels}: each level is 3 factors (D,H,W) of 1 or 2, "
                      f"at least one of them 2")
  return levels


def check_patch_size(shape: Sequence[int], depth: int, pooling=()) -> None:
  """Raises a ConfigError unless every spatial size of x [B,D,H,W,C] is a positive
  multiple of its axis's pooling factors' product (each level divides it exactly)."""
  if len(shape) != 5:
    raise ConfigError(f"unet3d takes x [B,D,H,W,C]; got shape {tuple(shape)}")
  factors = tuple(math.prod(axis) for axis in zip(*pooling_factors(depth, pooling)))
  spatial = tuple(int(s) for s in shape[1:4])
  if any(s <= 0 or s % f for s, f in zip(spatial, factors)):
    needs = (f"every size a multiple of {factors[0]}" if len(set(factors)) == 1
             else f"multiples of {factors} along (D,H,W)")
    raise ConfigError(f"data.patch_size={spatial}: unet3d with model.depth={depth} needs "
                      f"{needs}")


class UNet3D(nn.Module):
  """Encoder of `depth` pooling levels, channels doubling from `base_features` up to
  `max_features` (0: no cap), each level pooling by its `pooling` factors (default 2 along
  every axis); logits [B,D,H,W,num_classes] in float32, computed in `dtype` with float32
  parameters.

  `axis_name` is accepted for the network contract and unused: nothing here is
  synchronised across devices (the normalisation is per example)."""

  num_classes: int
  depth: int = 3
  base_features: int = 16
  norm: str = "instance"
  dropout: float = 0.0
  pooling: tuple = ()
  max_features: int = 0
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  def features(self, level: int) -> int:
    """The channels of a level (0 = full resolution, `depth` = the bottleneck)."""
    width = self.base_features * 2**level
    return min(width, self.max_features) if self.max_features else width

  @nn.compact
  def __call__(self, x, train: bool = False):
    check_patch_size(x.shape, self.depth, self.pooling)
    factors = pooling_factors(self.depth, self.pooling)
    x = x.astype(self.dtype)
    block = dict(norm=self.norm, dtype=self.dtype)
    skips = []
    for level in range(self.depth):
      x = ConvBlock3D(self.features(level), **block)(x)
      skips.append(x)
      x = max_pool(x, factors[level])
    x = ConvBlock3D(self.features(self.depth), **block)(x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for level in reversed(range(self.depth)):
      name = f"ConvTranspose_{self.depth - 1 - level}"  # as Flax names nn.ConvTranspose
      x = UpConv(self.features(level), factors[level], dtype=self.dtype, name=name)(x)
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = ConvBlock3D(self.features(level), **block)(x)
    logits = nn.Conv(self.num_classes, (1, 1, 1), dtype=self.dtype)(x)
    return logits.astype(jnp.float32)
