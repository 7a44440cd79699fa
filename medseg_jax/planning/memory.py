"""The device memory of a train step, from XLA's buffer assignment of the compiled step,
and the largest per-device batch that fits a budget.

Peak = arguments + outputs - donated aliases + temporaries (`compiled.memory_analysis()`).
No accelerator is needed: on a CPU the step is compiled for the CPU, so the figure is
XLA:CPU's buffer plan. A GPU's differs both ways (BENCHMARKS.md, "Largest U-Net batch per
device memory"): XLA:CPU computes bfloat16 convolutions in float32 (larger), and a GPU adds
the CUDA context and cuDNN workspaces (smaller here), which `DEFAULT_FRACTION` of an
accelerator's memory leaves room for.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import psutil

from medseg_jax import kinds, optim
from medseg_jax.errors import ConfigError
from medseg_jax.models import build_model
from medseg_jax.training import losses, state, step

GIB = 2**30
DEFAULT_FRACTION = 0.75  # of an accelerator's memory: JAX's default preallocation
GROWTH = 8
CPU_FRACTION = 0.5       # of the free RAM on a CPU, whose devices report no memory


def step_peak(cfg: ml_collections.ConfigDict, batch: int, num_classes: int,
              channels: int) -> int:
  """Bytes XLA plans for one train step of `cfg` (network, example shape, optimizer, loss
  and augmentation) at per-device `batch`, parameters and optimizer state included."""
  model = build_model(cfg.model, num_classes, cfg.data.image_size)
  tx = optim.make_optimizer(cfg, float(cfg.optim.lr))
  kind = kinds.from_config(cfg)
  example = kind.input_shape(channels)

  def init():
    params = model.init(jax.random.key(0), jnp.zeros((1,) + example))["params"]
    return state.TrainState.create(apply_fn=model.apply, params=params, model_state={}, tx=tx)
  fn = functools.partial(step.train_step, loss_fn=losses.get_loss(cfg.train.loss),
                         reduce_mean=lambda tree: tree, augment=kind.augmentation())
  batch_shapes = {"image": jax.ShapeDtypeStruct((batch,) + example, jnp.float32),
                  "label": jax.ShapeDtypeStruct((batch,) + example[:-1], jnp.int32)}
  compiled = jax.jit(fn, donate_argnums=0).lower(
      jax.eval_shape(init), batch_shapes, jax.random.key(0)).compile()
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
             + m.temp_size_in_bytes)


def largest_batch(budget: float, peak, limit: int = 0) -> tuple[int, dict[int, float]]:
  """The largest batch b <= `limit` (0: no limit) with peak(b) <= budget, 0 if batch 1
  does not fit; and the peaks measured, by batch. Each next batch compiled is the linear
  estimate of the boundary from the largest batch known to fit and the measured batch
  nearest it, kept strictly between the batches known to fit and not to fit, so a few
  compiles find the boundary even where the peak is not linear in the batch."""
  known = {}

  def fits(b):
    if b not in known:
      known[b] = peak(b)
    return known[b] <= budget
  if limit and fits(limit):  # a peak grows with the batch: every smaller batch fits too
    return limit, known
  if not fits(1):
    return 0, known
  lo, hi = 1, limit + 1 if limit else None  # lo fits; hi does not (or is past the limit)
  while hi is None or hi - lo > 1:
    if fits(_next_guess(known, budget, lo, hi)):
      lo = max(b for b in known if known[b] <= budget and (hi is None or b < hi))
    else:
      hi = min(b for b in known if known[b] > budget and b > lo)
  return lo, known


def _next_guess(known: dict[int, float], budget: float, lo: int, hi: int | None) -> int:
  """The batch where a line meets the budget, strictly within (lo, hi): through `lo` and
  `hi` once both are measured (kept a quarter of the interval from either end, so the
  interval shrinks at least by a quarter), else through `lo` and its nearest measured
  batch, at most GROWTH times `lo` further (a peak that hardly grows is not extrapolated
  to an astronomical batch)."""
  if hi in known:
    slope = max((known[hi] - known[lo]) / (hi - lo), 1e-9)
    guess = lo + int((budget - known[lo]) // slope)
    margin = (hi - lo) // 4
    return min(max(guess, lo + max(1, margin)), hi - max(1, margin))
  others = [b for b in known if b != lo]
  if not others:
    return lo + 1
  near = min(others, key=lambda b: abs(b - lo))
  slope = max((known[near] - known[lo]) / (near - lo), 1e-9)
  guess = max(lo + 1, lo + int(min((budget - known[lo]) / slope, GROWTH * lo)))
  return guess if hi is None else min(guess, hi - 1)


def interpolated_batches(budgets: list[float], peak) -> tuple[list[int], dict[int, float]]:
  """The largest batch for each budget, compiled only for the largest budget (as
  `largest_batch` finds it) and batches 1 and 2; the peaks of the batches between are
  interpolated linearly between the compiled ones. A few compiles instead of two per
  budget, where one compile takes minutes (3D at nnU-Net's patch sizes)."""
  top, known = largest_batch(max(budgets), peak)
  measured = sorted(known)
  fitted = {b: float(np.interp(b, measured, [known[k] for k in measured]))
            for b in range(1, top + 2)}
  fitted.update(known)
  batches = [max([b for b in range(1, top + 1) if fitted[b] <= budget], default=0)
             for budget in budgets]
  return batches, fitted


def device_budget(memory_gib: float = 0.0) -> tuple[int, str]:
  """The bytes a plan may use on each device, and where the figure comes from: `memory_gib`
  when given; else `DEFAULT_FRACTION` of an accelerator's memory; else (a CPU, whose
  devices report no memory) `CPU_FRACTION` of the free RAM shared by its devices."""
  if memory_gib < 0:
    raise ConfigError(f"--memory={memory_gib:g}: must be a positive number of GiB")
  if memory_gib:
    return int(memory_gib * GIB), f"--memory={memory_gib:g} GiB"
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get("bytes_limit"):
    limit = stats["bytes_limit"]
    return (int(DEFAULT_FRACTION * limit),
            f"{DEFAULT_FRACTION:.0%} of {device.device_kind}'s {limit / GIB:.1f} GiB")
  free = psutil.virtual_memory().available
  devices = jax.local_device_count()
  return (int(CPU_FRACTION * free / devices),
          f"{CPU_FRACTION:.0%} of the free RAM ({free / GIB:.1f} GiB) over {devices} "
          f"CPU device(s)")
