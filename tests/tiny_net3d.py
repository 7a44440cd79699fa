"""A network of one 3x3x3 convolution for the tests of the 3D path that need no U-Net
(named by file, as a user names their own network: `tests/tiny_net3d.py:Tiny3D`)."""

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp


class Tiny3D(nn.Module):
  """x [B,D,H,W,C] -> logits [B,D,H,W,num_classes]."""

  num_classes: int
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  features: int = 4
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 5:
      raise ValueError(f"Tiny3D takes x [B,D,H,W,C], got {x.shape}")
    x = nn.relu(nn.Conv(self.features, (3, 3, 3), dtype=self.dtype)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Conv(self.num_classes, (1, 1, 1), dtype=self.dtype)(x).astype(jnp.float32)


class Tiny3DDropout(Tiny3D):
  """Tiny3D with dropout after its convolution: training then depends on the step's rng."""

  dropout: float = 0.1
