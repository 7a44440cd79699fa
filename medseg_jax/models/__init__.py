"""The model registry: config `model.name` -> Flax module class."""

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from medseg_jax.errors import ConfigError
from medseg_jax.models.fcn import FCN
from medseg_jax.models.unet import UNet

MODELS = {"unet": UNet, "fcn": FCN}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("none", "group", "batch")


def build_model(cfg: ml_collections.ConfigDict, num_classes: int, image_size: int,
                axis_name: Optional[str] = None) -> nn.Module:
  """Builds the model that `cfg` (the `model` section) names, checking its settings."""
  if cfg.name not in MODELS:
    raise ConfigError(f"model.name={cfg.name!r}: unknown model, choose from {sorted(MODELS)}")
  if cfg.compute_dtype not in DTYPES:
    raise ConfigError(f"model.compute_dtype={cfg.compute_dtype!r}: choose from {sorted(DTYPES)}")
  if cfg.norm not in NORMS:
    raise ConfigError(f"model.norm={cfg.norm!r}: choose from {list(NORMS)}")
  common = dict(num_classes=num_classes, base_features=cfg.base_features,
                dropout=cfg.dropout, norm=cfg.norm, axis_name=axis_name,
                dtype=DTYPES[cfg.compute_dtype])
  if cfg.name == "unet":
    _check_divisible("unet", image_size, 2**cfg.depth)
    return UNet(depth=cfg.depth, **common)
  _check_divisible("fcn", image_size, 32)
  return FCN(fc_features=cfg.fc_features, **common)


def _check_divisible(name: str, image_size: int, factor: int) -> None:
  if image_size % factor:
    raise ConfigError(f"data.image_size={image_size}: {name} needs a multiple of {factor}")
