"""The networks: the built-in registry `MODELS` and `build_model`, which builds the network
`model.name` names (a built-in or a user's component, through `medseg_jax.components`).

The contract of a network, built-in or the user's own: a Flax linen module class whose
constructor takes the keywords the framework supplies,
  num_classes: int        the classes of the dataset (after `data.label_map`)
  dtype:       jnp.dtype  the compute dtype (`model.compute_dtype`; params stay float32)
  axis_name:   str | None the device axis for synchronised batch statistics, None when
                          XLA sees the global batch (the gspmd strategy)
plus `model.kwargs`; and whose `__call__(x, train)` maps x [B,H,W,C] (float32) to logits
[B,H,W,num_classes]. `train` switches dropout and batch statistics; a module with batch
statistics keeps them in the `batch_stats` collection.
"""

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from medseg_jax import components
from medseg_jax.errors import ConfigError, first_line
from medseg_jax.models.fcn import FCN
from medseg_jax.models.unet import UNet
from medseg_jax.models.unet3d import NORMS as NORMS_3D, UNet3D, pooling_factors

MODELS = {"unet": UNet, "fcn": FCN, "unet3d": UNet3D}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NORMS = ("none", "group", "batch")


def network(cfg: ml_collections.ConfigDict) -> components.Component:
  """The network class `model.name` names, checked to be a Flax linen module."""
  component = components.resolve("model.name", cfg.name, MODELS)
  if not (isinstance(component.obj, type) and issubclass(component.obj, nn.Module)):
    raise component.error(f"{component.name} is not a flax.linen.Module class")
  return component


def build_model(cfg: ml_collections.ConfigDict, num_classes: int, image_size: int,
                axis_name: Optional[str] = None) -> nn.Module:
  """Builds the network that `cfg` (the `model` section) names, checking its settings."""
  return construct(network(cfg), cfg, num_classes, image_size, axis_name)


def construct(component: components.Component, cfg: ml_collections.ConfigDict,
              num_classes: int, image_size: int, axis_name: Optional[str] = None) -> nn.Module:
  """The network of the resolved `component` (`network`) with the settings of `cfg`."""
  if cfg.compute_dtype not in DTYPES:
    raise ConfigError(f"model.compute_dtype={cfg.compute_dtype!r}: choose from {sorted(DTYPES)}")
  kwargs = _builtin_kwargs(cfg, image_size) if component.builtin else {}
  kwargs.update(cfg.kwargs.to_dict())
  try:
    return component.obj(num_classes=num_classes, dtype=DTYPES[cfg.compute_dtype],
                         axis_name=axis_name, **kwargs)
  except TypeError as e:
    raise component.error(f"its constructor does not take the framework's keywords "
                          f"(num_classes, dtype, axis_name) and model.kwargs: {e}") from e


def _builtin_kwargs(cfg: ml_collections.ConfigDict, image_size: int) -> dict:
  """The built-in networks' settings, from their own `model.*` keys."""
  if cfg.name == "unet3d":  # its patch size (data.patch_size) is checked on a call
    if cfg.norm not in NORMS_3D:
      raise ConfigError(f"model.norm={cfg.norm!r}: unet3d needs one of {list(NORMS_3D)}")
    return dict(base_features=cfg.base_features, dropout=cfg.dropout, norm=cfg.norm,
                depth=cfg.depth, max_features=cfg.max_features,
                pooling=pooling_factors(cfg.depth, cfg.pooling))
  if cfg.norm not in NORMS:
    raise ConfigError(f"model.norm={cfg.norm!r}: choose from {list(NORMS)}")
  common = dict(base_features=cfg.base_features, dropout=cfg.dropout, norm=cfg.norm)
  if cfg.name == "unet":
    _check_divisible("unet", image_size, 2**cfg.depth)
    return dict(common, depth=cfg.depth)
  _check_divisible("fcn", image_size, 32)
  return dict(common, fc_features=cfg.fc_features)


def _check_divisible(name: str, image_size: int, factor: int) -> None:
  if image_size % factor:
    raise ConfigError(f"data.image_size={image_size}: {name} needs a multiple of {factor}")


def abstract_variables(cfg: ml_collections.ConfigDict, model: nn.Module, num_classes: int,
                       size: int | tuple[int, ...], channels: int) -> dict:
  """The network's variables (shapes only, nothing computed), after checking that it
  initialises and maps x [1,size,size,channels] to logits [1,size,size,num_classes] in
  both modes: a user's network that breaks the contract is one ConfigError. A tuple
  `size` is the spatial shape itself (a 3D patch: x [1,D,H,W,channels])."""
  component = network(cfg)
  spatial = (size, size) if isinstance(size, int) else tuple(size)
  sample = jax.ShapeDtypeStruct((1, *spatial, channels), jnp.float32)
  shown = ",".join(str(n) for n in sample.shape)
  key = jax.eval_shape(lambda: jax.random.key(0))
  def train(variables, x, rng):
    return model.apply(variables, x, train=True, rngs={"dropout": rng},
                       mutable=["batch_stats"])[0]
  if model.axis_name is not None:  # synchronised batch statistics need the device axis bound
    train = jax.vmap(train, in_axes=(None, None, None), axis_name=model.axis_name,
                     axis_size=1)
  try:
    variables = jax.eval_shape(functools.partial(model.init, train=False), key, sample)
    outputs = [jax.eval_shape(functools.partial(model.apply, train=False), variables, sample),
               jax.eval_shape(train, variables, sample, key)]
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the user's code may raise anything)
    raise component.error(f"fails on x [{shown}] with __call__(x, train): "
                          f"{type(e).__name__}: {first_line(e)}") from e
  expected = (1, *spatial, num_classes)
  for mode, logits in zip((False, True), outputs):
    if mode and model.axis_name is not None:
      logits = jax.ShapeDtypeStruct(logits.shape[1:], logits.dtype)  # vmap's axis
    if getattr(logits, "shape", None) != expected:
      raise component.error(f"returns {getattr(logits, 'shape', type(logits).__name__)} for "
                            f"x [{shown}] with train={mode}; "
                            f"logits {list(expected)} expected")
  return variables
