"""Optimizers and learning-rate policies (optax) for large data-parallel batches.

Every length in the config is in epochs; `resolve_schedule` converts them to steps
with the real steps per epoch, which depend on the global batch.
"""

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from medseg_jax.errors import ConfigError

SCALING_RULES: dict[str, Callable[[float], float]] = {
    "none": lambda k: 1.0,
    "linear": lambda k: k,          # Goyal et al. 2017
    "sqrt": math.sqrt,
}
POLICIES = ("standard", "grescale")
WARMUPS = ("none", "constant", "gradual")
DECAYS = ("none", "step", "cosine", "poly")
OPTIMIZERS = ("sgd", "adam", "adamw", "lars")


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


@dataclasses.dataclass(frozen=True)
class Phase:
  name: str
  start: int   # first step
  end: int     # one past the last step
  lr_start: float
  lr_end: float  # LR at the phase's last step


@dataclasses.dataclass(frozen=True)
class ResolvedSchedule:
  """The schedule in steps, with its phases (for logging, plots and the manifest)."""

  schedule: optax.Schedule
  phases: tuple[Phase, ...]
  k: float
  peak_lr: float
  steps_per_epoch: int

  def describe(self) -> str:
    lines = [f"k={self.k:g}, peak LR {self.peak_lr:.4g}, {self.steps_per_epoch} steps/epoch"]
    for p in self.phases:
      lines.append(f"  {p.name:13s} steps {p.start:>7d}-{p.end:<7d} epochs "
                   f"{p.start / self.steps_per_epoch:7.2f}-{p.end / self.steps_per_epoch:<7.2f} "
                   f"LR {p.lr_start:.4g} -> {p.lr_end:.4g}")
    return "\n".join(lines)


def resolve_schedule(cfg: ml_collections.ConfigDict, global_batch: int, steps_per_epoch: int,
                     num_steps: int) -> ResolvedSchedule:
  """The LR policy of `cfg` as an optax schedule over `num_steps` steps."""
  if cfg.lr.policy not in POLICIES:
    raise ConfigError(f"lr.policy={cfg.lr.policy!r}: choose from {list(POLICIES)}")
  # Checked under every policy: the guideline tuner switches a standard config to
  # GreScale after its baseline has trained, too late to find a bad value.
  check_grescale(cfg.lr.grescale)
  peak = peak_learning_rate(cfg, global_batch)
  to_steps = lambda epochs: int(round(epochs * steps_per_epoch))
  build = _grescale if cfg.lr.policy == "grescale" else _standard
  pieces = build(cfg, peak, to_steps, num_steps, steps_per_epoch)
  schedule = _join(pieces)
  phases, start = [], 0
  for name, length, fn in pieces:
    phases.append(Phase(name, start, start + length, float(fn(0)), float(fn(max(length - 1, 0)))))
    start += length
  return ResolvedSchedule(schedule, tuple(phases), scaling_factor(cfg, global_batch), peak,
                          steps_per_epoch)


Piece = tuple[str, int, optax.Schedule]  # (phase name, length in steps, schedule from 0)


def _join(pieces: list[Piece]) -> optax.Schedule:
  """The pieces one after the other; the LR has the shape of `step`, also where a piece is
  constant (optax's constant schedules return a scalar for an array of steps)."""
  pieces = [p for p in pieces if p[1] > 0] or pieces[-1:]
  boundaries, total = [], 0
  for _, length, _ in pieces[:-1]:
    total += length
    boundaries.append(total)
  joined = optax.join_schedules([fn for _, _, fn in pieces], boundaries)
  return lambda step: jnp.broadcast_to(joined(step), jnp.shape(step))


def _ramp(start: float, end: float, steps: int) -> optax.Schedule:
  """Linear from `start` at step 0 to `end` at `steps` (exact at step 0, unlike
  optax.linear_schedule, which rounds a tiny start LR through `end` in float32)."""
  return lambda step: start + (end - start) * jnp.clip(step / max(steps, 1), 0.0, 1.0)


def _standard(cfg, peak: float, to_steps, num_steps: int, steps_per_epoch: int) -> list[Piece]:
  """Warmup (`lr.warmup`) then the main schedule with `lr.decay`."""
  lr = cfg.lr
  if lr.warmup not in WARMUPS:
    raise ConfigError(f"lr.warmup={lr.warmup!r}: choose from {list(WARMUPS)}")
  if lr.decay not in DECAYS:
    raise ConfigError(f"lr.decay={lr.decay!r}: choose from {list(DECAYS)}")
  warm = 0 if lr.warmup == "none" else min(to_steps(lr.warmup_epochs), num_steps)
  base = cfg.optim.lr
  pieces = []
  if lr.warmup == "constant":
    pieces.append(("warmup", warm, optax.constant_schedule(base)))
  elif lr.warmup == "gradual":
    pieces.append(("warmup", warm, _ramp(base, peak, warm)))
  rest = num_steps - warm
  if lr.decay == "none":
    main = optax.constant_schedule(peak)
  elif lr.decay == "step":
    bounds = {to_steps(e) - warm: lr.step_factor for e in lr.step_epochs if to_steps(e) > warm}
    main = optax.piecewise_constant_schedule(peak, bounds)
  elif lr.decay == "cosine":
    main = optax.cosine_decay_schedule(peak, max(rest, 1))
  else:
    main = optax.polynomial_schedule(peak, 0.0, lr.poly_power, max(rest, 1))
  return pieces + [("main", rest, main)]


def check_grescale(g: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first `lr.grescale` key that cannot be used."""
  if not 0 < g.stabilisation_factor <= 1:
    raise ConfigError(f"lr.grescale.stabilisation_factor={g.stabilisation_factor}: must be in "
                      "(0, 1] (the stabilisation holds at most the warmup's target)")
  for key in ("warmup_epochs", "decay_epochs", "decay_coefficient"):
    if g[key] < 0:
      raise ConfigError(f"lr.grescale.{key}={g[key]}: must not be negative")


def grescale_decay_epochs(decay_epochs: float, epochs: float) -> float:
  """GreScale's decay length in epochs: `lr.grescale.decay_epochs`, or for 0 the thesis's
  default, 3/7 of the epochs after the first 5."""
  return decay_epochs or 3.0 / 7.0 * max(epochs - 5.0, 0.0)


def _grescale(cfg, peak: float, to_steps, num_steps: int, steps_per_epoch: int) -> list[Piece]:
  """GreScale: warmup from the base LR eta (`optim.lr`, the thesis's "initial LR") to the
  scaled `peak` (k * eta), stabilisation at `stabilisation_factor` * peak, then decay.

  Every value is proportional to eta, so lowering `optim.lr` lowers the whole schedule.
  The decay phase lasts `lr.grescale.decay_epochs` (0 = 3/7 of the epochs after the
  first 5); warmup and stabilisation share the rest, so lengthening the warmup shortens
  the stabilisation. The decay is time-based: LR = held / (1 + c * epochs into decay).
  """
  g = cfg.lr.grescale
  decay_epochs = grescale_decay_epochs(g.decay_epochs, num_steps / steps_per_epoch)
  warm = min(to_steps(g.warmup_epochs), num_steps)
  decay = min(to_steps(decay_epochs), num_steps - warm)
  stable = num_steps - warm - decay
  held = peak * g.stabilisation_factor
  coefficient = g.decay_coefficient / steps_per_epoch  # per step
  return [
      # The ramp reaches the peak at the warmup's last step, so the peak is trained with
      # even though the stabilisation holds less.
      ("warmup", warm, _ramp(cfg.optim.lr, peak, warm - 1)),
      ("stabilisation", stable, optax.constant_schedule(held)),
      ("decay", decay, lambda step: held / (1.0 + coefficient * jnp.maximum(step, 0))),
  ]


def make_optimizer(cfg: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """The `optim` section as an optax chain (clipping, weight decay, optimizer)."""
  o = cfg.optim
  decay = [optax.add_decayed_weights(o.weight_decay)] if o.weight_decay else []
  if o.name == "sgd":
    parts = decay + [optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov)]
  elif o.name == "adam":
    parts = decay + [optax.adam(schedule)]
  elif o.name == "adamw":
    parts = [optax.adamw(schedule, weight_decay=o.weight_decay)]
  elif o.name == "lars":
    parts = [optax.lars(schedule, weight_decay=o.weight_decay, momentum=o.momentum,
                        nesterov=o.nesterov, trust_coefficient=o.lars_trust_coefficient)]
  else:
    raise ConfigError(f"optim.name={o.name!r}: choose from {sorted(OPTIMIZERS)}")
  if o.grad_clip_norm:
    parts.insert(0, optax.clip_by_global_norm(o.grad_clip_norm))
  return optax.chain(*parts)


def with_step(opt_state: optax.OptState, step: int) -> optax.OptState:
  """`opt_state` with every step counter set to `step`, for a run that continues at another
  global batch and so another step numbering."""
  # Counters set, not the schedule shifted by an offset: the state's step stays the one
  # number that says where training is, for the schedule inside the optimizer, the loop,
  # the guard and any later resume (an offset would be a second number to save with every
  # checkpoint and add up over resumes). Adam's bias correction reads the same counter, so
  # it corrects as if the moments had run `step` updates: a difference that fades as
  # beta2 to the power of the smaller step. optax names every counter `count`, and its
  # `tree_set` raises KeyError where there is none; tests/test_optim.py compares every
  # chain `make_optimizer` builds with a fresh optimizer stepped `step` times. A host
  # value, so that placing the state gives each counter its own buffer (one device array
  # in two leaves would be donated twice by the train step, which crashes XLA).
  return optax.tree_utils.tree_set(opt_state, count=np.asarray(step, np.int32))

