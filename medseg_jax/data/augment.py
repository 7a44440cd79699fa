"""On-device augmentation: a random affine per example (and flips and intensity jitter).

Pure JAX, applied inside the jitted train step to the batch on the device, so the host
only ever reads stored slices. Each example gets its own key split from the step's key;
images are resampled bilinearly and labels by nearest neighbour through the same
coordinates, so they stay aligned. Pixels from outside the slice are 0 (the background
of a normalised image, and class 0). Evaluation never augments.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.scipy import ndimage

from medseg_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Ranges:
  """Largest transformation of each kind; all zero (and zoom (1, 1)) is the identity."""

  rotation_degrees: float = 0.0
  zoom: tuple = (1.0, 1.0)
  translate_pixels: float = 0.0
  flip_probability: float = 0.0
  intensity_scale: float = 0.0
  intensity_shift: float = 0.0


@dataclasses.dataclass(frozen=True)
class Transform:
  """One example's sampled parameters (arrays, so they can be vmapped)."""

  angle: jax.Array     # radians
  zoom: jax.Array
  shift: jax.Array     # [2] pixels along rows, columns
  flip: jax.Array      # [2] bool: mirror rows, columns
  scale: jax.Array     # intensity factor
  offset: jax.Array    # intensity offset


def ranges_from_config(cfg: ml_collections.ConfigDict) -> Ranges | None:
  """The checked 2D ranges of a `data.augment` section, or None when it is off."""
  if not cfg.enabled:
    return None
  ranges = Ranges(rotation_degrees=float(cfg.rotation_degrees),
                  zoom=tuple(float(z) for z in cfg.zoom),
                  translate_pixels=float(cfg.translate_pixels),
                  flip_probability=float(cfg.flip_probability),
                  intensity_scale=float(cfg.intensity_scale),
                  intensity_shift=float(cfg.intensity_shift))
  _check(ranges)
  return ranges


def samples_per_epoch(cfg: ml_collections.ConfigDict) -> int:
  """`data.augment.samples_per_epoch`, checked: draws per epoch, 0 = one pass."""
  value = cfg.samples_per_epoch
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ConfigError(f"data.augment.samples_per_epoch={value!r}: must be a whole number "
                      "of at least 0 (0 = one pass over the training slices)")
  return value


def _check(r: Ranges) -> None:
  check_ranges(r, ("rotation_degrees", "translate_pixels", "intensity_scale",
                   "intensity_shift"))


def check_ranges(r, nonnegative: tuple[str, ...]) -> None:
  """Raises a ConfigError naming the `data.augment` key of a range of `r` (2D or 3D
  `Ranges`) that makes no sense: the zoom, the flip probability, and the `nonnegative`
  fields."""
  if len(r.zoom) != 2 or not 0 < r.zoom[0] <= r.zoom[1]:
    raise ConfigError(f"data.augment.zoom={r.zoom}: need (low, high) with 0 < low <= high")
  if not 0 <= r.flip_probability <= 1:
    raise ConfigError(f"data.augment.flip_probability={r.flip_probability}: must be in [0, 1]")
  for key in nonnegative:
    if getattr(r, key) < 0:
      raise ConfigError(f"data.augment.{key}={getattr(r, key)}: must not be negative")


def sample(key: jax.Array, r: Ranges) -> Transform:
  """Uniform rotation, zoom, translation and intensity jitter; independent flips."""
  k = jax.random.split(key, 6)
  angle = math.radians(r.rotation_degrees)
  return Transform(
      angle=jax.random.uniform(k[0], (), minval=-angle, maxval=angle),
      zoom=jax.random.uniform(k[1], (), minval=r.zoom[0], maxval=r.zoom[1]),
      shift=jax.random.uniform(k[2], (2,), minval=-r.translate_pixels,
                               maxval=r.translate_pixels),
      flip=jax.random.bernoulli(k[3], r.flip_probability, (2,)),
      scale=jax.random.uniform(k[4], (), minval=1 - r.intensity_scale,
                               maxval=1 + r.intensity_scale),
      offset=jax.random.uniform(k[5], (), minval=-r.intensity_shift,
                                maxval=r.intensity_shift))


def source_coordinates(t: Transform, height: int, width: int) -> jax.Array:
  """[2,H,W] input (row, column) read by each output pixel.

  The forward map is out = c + zoom * R(angle) F (in - c) + shift about the centre c,
  with F the flips; here it is inverted: in = c + F R(-angle) (out - c - shift) / zoom."""
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  out = jnp.stack([rows, cols]) - (centre + t.shift)[:, None, None]
  cos, sin = jnp.cos(t.angle), jnp.sin(t.angle)
  inverse_rotation = jnp.array([[cos, sin], [-sin, cos]])
  back = jnp.einsum("ij,jhw->ihw", inverse_rotation, out) / t.zoom
  back = jnp.where(t.flip[:, None, None], -back, back)
  return back + centre[:, None, None]


def apply(t: Transform, image: jax.Array, label: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One example: image [H,W,C] bilinear, label [H,W] nearest, through the same map."""
  coords = source_coordinates(t, *label.shape)
  resample = lambda x, order: ndimage.map_coordinates(x, list(coords), order=order,
                                                      mode="constant", cval=0)
  image = jax.vmap(lambda channel: resample(channel, 1), in_axes=-1, out_axes=-1)(image)
  label = resample(label, 0)
  return image * t.scale + t.offset, label


def augment_batch(key: jax.Array, images: jax.Array, labels: jax.Array, *,
                  ranges: Ranges) -> tuple[jax.Array, jax.Array]:
  """A batch [B,H,W,C], [B,H,W], each example with its own key split from `key`."""
  keys = jax.random.split(key, images.shape[0])
  one = lambda k, image, label: apply(sample(k, ranges), image, label)
  return jax.vmap(one)(keys, images, labels)
