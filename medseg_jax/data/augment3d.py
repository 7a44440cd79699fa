"""On-device 3D augmentation: a random rotation and scaling per example, flips, intensity.

The 3D counterpart of `augment.py`, for patches [B,D,H,W,C] and labels [B,D,H,W]: pure
JAX, applied inside the jitted train step, each example with its own key split from the
step's key, so a batch is augmented the same way for the same key and differently per
example. Images are resampled trilinearly and labels by nearest neighbour through the same
coordinates, so they stay aligned; voxels from outside the patch are 0 (the background of a
normalised image, and class 0). Evaluation never augments.

`augment_batch(key, images, labels, ranges=...)` has the signature the train step's
`augment` takes (bind `ranges` with functools.partial). Its ranges are meant to come from
the `data.augment` keys of the 2D augmentation (enabled, rotation_degrees, zoom,
flip_probability, intensity_scale, intensity_shift), with rotation_degrees about each of
the three axes.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from medseg_jax.data import augment
from medseg_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Ranges:
  """Largest transformation of each kind; the defaults are the identity."""

  rotation_degrees: tuple = (0.0, 0.0, 0.0)  # about the D, H and W axes
  zoom: tuple = (1.0, 1.0)                   # (low, high), the same along every axis
  flip_probability: float = 0.0              # each axis independently
  intensity_scale: float = 0.0
  intensity_shift: float = 0.0


@dataclasses.dataclass(frozen=True)
class Transform:
  """One example's sampled parameters (arrays, so they can be vmapped)."""

  angles: jax.Array  # [3] radians, about the D, H and W axes
  zoom: jax.Array
  flip: jax.Array    # [3] bool: mirror along D, H, W
  scale: jax.Array   # intensity factor
  offset: jax.Array  # intensity offset


def check(r: Ranges) -> None:
  """Raises a ConfigError naming the `data.augment` key of a range that makes no sense."""
  if len(r.rotation_degrees) != 3 or any(a < 0 for a in r.rotation_degrees):
    raise ConfigError(f"data.augment.rotation_degrees={r.rotation_degrees}: need three "
                      "angles of at least 0, about the D, H and W axes")
  augment.check_ranges(r, ("intensity_scale", "intensity_shift"))


def sample(key: jax.Array, r: Ranges) -> Transform:
  """Uniform angles, zoom and intensity jitter; independent flips per axis."""
  k = jax.random.split(key, 5)
  limit = jnp.array([math.radians(a) for a in r.rotation_degrees], jnp.float32)
  return Transform(
      angles=jax.random.uniform(k[0], (3,), minval=-limit, maxval=limit),
      zoom=jax.random.uniform(k[1], (), minval=r.zoom[0], maxval=r.zoom[1]),
      flip=jax.random.bernoulli(k[2], r.flip_probability, (3,)),
      scale=jax.random.uniform(k[3], (), minval=1 - r.intensity_scale,
                               maxval=1 + r.intensity_scale),
      offset=jax.random.uniform(k[4], (), minval=-r.intensity_shift,
                                maxval=r.intensity_shift))


def rotation(angles: jax.Array) -> jax.Array:
  """[3,3] rotation about the D axis, then the H axis, then the W axis (each in the plane
  of the other two)."""
  def about(axis, angle):
    i, j = [a for a in range(3) if a != axis]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    m = jnp.eye(3)
    return m.at[i, i].set(cos).at[i, j].set(-sin).at[j, i].set(sin).at[j, j].set(cos)
  return about(2, angles[2]) @ about(1, angles[1]) @ about(0, angles[0])


def source_coordinates(t: Transform, shape: tuple) -> jax.Array:
  """[3,D,H,W] input (d, h, w) read by each output voxel.

  The forward map is out = c + zoom * R F (in - c) about the centre c, with F the flips;
  here it is inverted: in = c + F R^T (out - c) / zoom."""
  centre = jnp.array([(n - 1) / 2 for n in shape], jnp.float32)
  grid = jnp.stack(jnp.meshgrid(*[jnp.arange(n, dtype=jnp.float32) for n in shape],
                                indexing="ij"))
  out = grid - centre[:, None, None, None]
  back = jnp.einsum("ji,jdhw->idhw", rotation(t.angles), out) / t.zoom
  back = jnp.where(t.flip[:, None, None, None], -back, back)
  return back + centre[:, None, None, None]


def apply(t: Transform, image: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One example: image [D,H,W,C] trilinear, label [D,H,W] nearest, through the same map."""
  coords = list(source_coordinates(t, label.shape))
  resample = lambda x, order: ndimage.map_coordinates(x, coords, order=order,
                                                      mode="constant", cval=0)
  image = jax.vmap(lambda channel: resample(channel, 1), in_axes=-1, out_axes=-1)(image)
  return image * t.scale + t.offset, resample(label, 0)


def augment_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *,
                  ranges: Ranges) -> tuple[jax.Array, jax.Array]:
  """A batch [B,D,H,W,C], [B,D,H,W], each example with its own key split from `key`."""
  keys = jax.random.split(key, images.shape[0])
  one = lambda k, image, label: apply(sample(k, ranges), image, label)
  return jax.vmap(one)(keys, images, labels)
