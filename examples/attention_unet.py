"""Attention U-Net: a U-Net whose skip connections pass through additive attention gates.

Oktay, O., Schlemper, J., Le Folgoc, L., et al. "Attention U-Net: Learning Where to Look
for the Pancreas." Medical Imaging with Deep Learning (MIDL), 2018. arXiv:1804.03999.

Each gate weighs the encoder's features x at one level by a coefficient in (0, 1) per
pixel, computed from x and the decoder's coarser features g (here after the up-convolution,
at x's resolution): alpha = sigmoid(psi(relu(W_x x + W_g g))). Where alpha is small the
skip passes little, so the decoder attends to the structures the gating signal finds.

A network component of medseg_jax (docs/components.md, "Your own network, loss and plugins"): a Flax
linen module built with the framework's keywords (num_classes, dtype, axis_name) and
`model.kwargs`, mapping x [B,H,W,C] to logits [B,H,W,num_classes]. It reuses the
package's 2x2 pooling and up-convolution, which XLA's CPU backend differentiates faster
than nn.max_pool and nn.ConvTranspose, and its convolution block.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from medseg_jax.models.unet import ConvBlock, UpConv2x2, max_pool_2x2


class AttentionGate(nn.Module):
  """x * sigmoid(psi(relu(W_x x + W_g g))), one coefficient per pixel."""

  inter_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, g):
    theta = nn.Conv(self.inter_features, (1, 1), use_bias=False, dtype=self.dtype)(x)
    phi = nn.Conv(self.inter_features, (1, 1), dtype=self.dtype)(g)
    alpha = nn.sigmoid(nn.Conv(1, (1, 1), dtype=self.dtype)(nn.relu(theta + phi)))
    return x * alpha


class AttentionUNet(nn.Module):
  """U-Net of `depth` pooling levels from `base_features` channels, gated skips."""

  num_classes: int
  base_features: int = 16
  depth: int = 3
  norm: str = "none"
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    block = dict(norm=self.norm, axis_name=self.axis_name, dtype=self.dtype)
    x = x.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      x = ConvBlock(self.base_features * 2**level, **block)(x, train)
      skips.append(x)
      x = max_pool_2x2(x)
    x = ConvBlock(self.base_features * 2**self.depth, **block)(x, train)
    for level in reversed(range(self.depth)):
      features = self.base_features * 2**level
      x = UpConv2x2(features, dtype=self.dtype)(x)
      gated = AttentionGate(max(features // 2, 1), dtype=self.dtype)(skips[level], x)
      x = ConvBlock(features, **block)(jnp.concatenate([gated, x], axis=-1), train)
    logits = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype)(x)
    return logits.astype(jnp.float32)
