"""FCN-8s (Long et al. 2015) with a VGG-16-style encoder.

fc6/fc7 are convolutions; the coarse scores are upsampled with transposed
convolutions and fused with scores from pool4 and pool3. 'SAME' padding replaces
the original 100-pixel input padding and crops, so the input side must be a
multiple of 32 and the output has the input's size.
"""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from medseg_jax.models.unet import make_norm, max_pool_2x2

VGG16_BLOCKS = (2, 2, 3, 3, 3)       # convs per block; channels x1, x2, x4, x8, x8
VGG16_WIDTHS = (1, 2, 4, 8, 8)


class FCN(nn.Module):
  """FCN-8s; `base_features`=64 and `fc_features`=4096 give the original widths."""

  num_classes: int
  base_features: int = 64
  fc_features: int = 4096
  dropout: float = 0.5
  norm: str = "none"
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    height, width = x.shape[1:3]
    x = x.astype(self.dtype)
    pools = []
    for convs, width_mult in zip(VGG16_BLOCKS, VGG16_WIDTHS):
      features = self.base_features * width_mult
      for _ in range(convs):
        x = nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype)(x)
        x = make_norm(self.norm, features, self.axis_name, self.dtype, train)(x)
        x = nn.relu(x)
      x = max_pool_2x2(x)
      pools.append(x)
    pool3, pool4, x = pools[2], pools[3], pools[4]
    for name, kernel in (("fc6", (7, 7)), ("fc7", (1, 1))):
      x = nn.relu(nn.Conv(self.fc_features, kernel, padding="SAME", dtype=self.dtype,
                          name=name)(x))
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    score = self._score(x, "score_fr")
    score = self._up(score, 2, "upscore2") + self._score(pool4, "score_pool4")
    score = self._up(score, 2, "upscore_pool4") + self._score(pool3, "score_pool3")
    logits = self._up(score, 8, "upscore8")
    assert logits.shape[1:3] == (height, width), (logits.shape, height, width)
    return logits.astype(jnp.float32)

  def _score(self, x, name):
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name=name)(x)

  def _up(self, x, factor, name):
    return nn.ConvTranspose(self.num_classes, (2 * factor, 2 * factor),
                            strides=(factor, factor), padding="SAME",
                            dtype=self.dtype, name=name)(x)
