"""Optimizers and learning-rate policies (optax) for large data-parallel batches."""

import math
from typing import Callable

import ml_collections
import optax

from medseg_jax.errors import ConfigError

SCALING_RULES: dict[str, Callable[[float], float]] = {
    "none": lambda k: 1.0,
    "linear": lambda k: k,          # Goyal et al. 2017
    "sqrt": math.sqrt,
}


def scaling_factor(cfg: ml_collections.ConfigDict, global_batch: int) -> float:
  """k = global batch / reference batch (the per-device batch unless configured)."""
  reference = cfg.lr.reference_batch_size or cfg.train.per_device_batch_size
  if reference <= 0:
    raise ConfigError(f"lr.reference_batch_size={reference}: must be positive")
  return global_batch / reference


def peak_learning_rate(cfg: ml_collections.ConfigDict, global_batch: int) -> float:
  """The base LR scaled for the global batch by `lr.scaling`."""
  if cfg.lr.scaling not in SCALING_RULES:
    raise ConfigError(f"lr.scaling={cfg.lr.scaling!r}: choose from {sorted(SCALING_RULES)}")
  return cfg.optim.lr * SCALING_RULES[cfg.lr.scaling](scaling_factor(cfg, global_batch))


def make_schedule(cfg: ml_collections.ConfigDict, global_batch: int) -> optax.Schedule:
  return optax.constant_schedule(peak_learning_rate(cfg, global_batch))


def make_optimizer(cfg: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """The `optim` section as an optax chain (clipping, weight decay, optimizer)."""
  o = cfg.optim
  if o.name == "sgd":
    core = optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov)
    parts = [optax.add_decayed_weights(o.weight_decay)] if o.weight_decay else []
    parts.append(core)
  elif o.name == "adam":
    parts = ([optax.add_decayed_weights(o.weight_decay)] if o.weight_decay else [])
    parts.append(optax.adam(schedule))
  elif o.name == "adamw":
    parts = [optax.adamw(schedule, weight_decay=o.weight_decay)]
  else:
    raise ConfigError(f"optim.name={o.name!r}: choose from ['adam', 'adamw', 'sgd']")
  if o.grad_clip_norm:
    parts.insert(0, optax.clip_by_global_norm(o.grad_clip_norm))
  return optax.chain(*parts)
