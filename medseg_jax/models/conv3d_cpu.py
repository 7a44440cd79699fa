"""A 3x3x3 convolution whose kernel gradient XLA's CPU backend is spared, where measured faster.

XLA's CPU backend computes a convolution's kernel gradient as a convolution over the batch
and spatial axes, 1.4-1.8x as slow as its forward pass for the 3D U-Net's shapes
(BENCHMARKS.md; openxla/xla issue 34273 reports worse). Here the kernel gradient of a
3x3x3 'SAME' convolution with stride 1 is written as what it is: for each of the 27 kernel
offsets, the input shifted by that offset [voxels, C_in] times the output gradient
[voxels, C_out], as matrix products XLA runs as plain GEMMs. The forward pass and the input
gradient stay XLA's own convolutions.

`conv_general_dilated` has lax's signature, so `nn.Conv(conv_general_dilated=...)` takes it
and the parameters stay those of `nn.Conv`. It uses the custom kernel gradient only on the
CPU backend (`jax.default_backend()`), and only for the shapes `use_shifted` accepts: the
ones where benchmarks/conv3d_cpu.py measured it faster than XLA's (BENCHMARKS.md, "3D
convolutions on CPU"). Everything else, and every GPU, is `lax.conv_general_dilated`.
"""

import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# NDHWC inputs and outputs, DHWIO kernels: the layout flax's nn.Conv hands lax.
DIMENSION_NUMBERS = lax.ConvDimensionNumbers(lhs_spec=(0, 4, 1, 2, 3),
                                             rhs_spec=(4, 3, 0, 1, 2),
                                             out_spec=(0, 4, 1, 2, 3))
# The measured rule (BENCHMARKS.md, "3D convolutions on CPU"): the shifted matrix products
# beat XLA's kernel gradient from 6^3 to 64^3 voxels per example (the largest measured) and
# 2 to 128 input channels. Below 6^3 the products per depth plane are too small (4^3 with
# 64-128 channels measured 1.2-2.5x slower); with one input channel they measured 0.3-1.1x
# XLA's time, so the first convolution of a single-modality network keeps XLA's.
MIN_VOXELS = 6**3
MAX_VOXELS = 64**3
MIN_INPUT_CHANNELS = 2


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
                                  dimension_numbers=DIMENSION_NUMBERS)


def kernel_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
  """d(sum(g * conv(x, k)))/dk for a 3x3x3 'SAME' stride-1 convolution: x [B,D,H,W,I],
  g [B,D,H,W,O] -> [3,3,3,I,O], as matrix products of shifted inputs with g."""
  d, h, w = x.shape[1:4]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
  # The three shifts along W side by side as channels [B,D+2,H+2,W,3I]: 9 products with
  # 3I rows instead of 27 with I, which compile about three times faster.
  shifted = jnp.concatenate([padded[..., c:c + w, :] for c in range(3)], axis=-1)
  # One product per depth plane, summed after: measured faster on large volumes than one
  # product over every voxel, whose single huge contraction parallelises poorly.
  rows = [jnp.einsum("bdhwk,bdhwo->dko", shifted[:, a:a + d, b:b + h], g,
                     preferred_element_type=jnp.float32).sum(axis=0)
          for a, b in itertools.product(range(3), repeat=2)]
  return jnp.stack(rows).reshape(3, 3, 3, x.shape[-1], g.shape[-1])


@jax.custom_vjp
def conv3x3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """XLA's 3x3x3 'SAME' stride-1 convolution, NDHWC x DHWIO, with `kernel_gradient` as
  its kernel gradient."""
  return _xla_conv(x, kernel)


def _forward(x, kernel):
  return _xla_conv(x, kernel), (x, kernel)


def _backward(residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _xla_conv(v, kernel), x)
  return input_vjp(g)[0], kernel_gradient(x, g).astype(kernel.dtype)


conv3x3x3.defvjp(_forward, _backward)


def use_shifted(x_shape: Sequence[int], kernel_shape: Sequence[int]) -> bool:
  """Whether a 3x3x3 convolution of these shapes takes the shifted kernel gradient: on the
  CPU backend, for the shapes where it measured faster than XLA's."""
  if jax.default_backend() != "cpu" or tuple(kernel_shape[:3]) != (3, 3, 3):
    return False
  voxels = x_shape[1] * x_shape[2] * x_shape[3]
  return MIN_VOXELS <= voxels <= MAX_VOXELS and kernel_shape[3] >= MIN_INPUT_CHANNELS


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, with the shifted kernel gradient for a plain 3x3x3 'SAME'
  convolution in nn.Conv's 3D layout where `use_shifted` accepts its shapes."""
  plain = (lhs.ndim == 5 and tuple(window_strides) == (1, 1, 1) and padding == "SAME"
           and tuple(lhs_dilation or (1, 1, 1)) == (1, 1, 1)
           and tuple(rhs_dilation or (1, 1, 1)) == (1, 1, 1)
           and dimension_numbers == DIMENSION_NUMBERS and feature_group_count == 1
           and batch_group_count == 1 and precision is None and preferred_element_type is None)
  if plain and use_shifted(lhs.shape, rhs.shape):
    return conv3x3x3(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type)
