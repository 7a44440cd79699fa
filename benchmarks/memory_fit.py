"""The largest per-device batch of the thesis U-Net whose train step fits a device's memory.

    python benchmarks/memory_fit.py      # --device_memory_gib=11 --size=256 (a GTX 1080 Ti)

The memory of one train step (parameters, optimizer state, batch, activations kept
for the backward pass, gradients, temporaries) comes from XLA's buffer assignment of
the compiled step: `compiled.memory_analysis()`, peak = arguments + outputs - donated
aliases + temporaries. No accelerator is needed: the step is compiled for this CPU, so
the figures are XLA:CPU's buffer plan; a GPU's plan differs in fusion and adds the
CUDA context and cuDNN workspaces. The budget is the device memory times JAX's default
preallocated fraction (0.75) and times 1.0 (the whole card).
"""

import argparse
import functools
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def step_memory(batch: int, size: int, dtype: str, base: int, depth: int) -> dict:
  """XLA's memory analysis of the compiled train step at per-device `batch`."""
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  from configs import base as base_config
  from medseg_jax import optim
  from medseg_jax.training import losses, state, step
  from medseg_jax.models import build_model

  cfg = base_config.get_config()
  cfg.model.update({"name": "unet", "base_features": base, "depth": depth,
                    "compute_dtype": dtype})
  model = build_model(cfg.model, 2, size)
  tx = optim.make_optimizer(cfg, 1e-5)   # SGD with momentum, as the thesis

  def init():
    params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 1)))["params"]
    return state.TrainState.create(apply_fn=model.apply, params=params, model_state={}, tx=tx)
  fn = functools.partial(step.train_step, loss_fn=losses.dice_ce_loss,
                         reduce_mean=lambda tree: tree)
  batch_shapes = {"image": jax.ShapeDtypeStruct((batch, size, size, 1), jnp.float32),
                  "label": jax.ShapeDtypeStruct((batch, size, size), jnp.int32)}
  compiled = jax.jit(fn, donate_argnums=0).lower(
      jax.eval_shape(init), batch_shapes, jax.random.key(0)).compile()
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes)
  return {"batch": batch, "peak": peak, "arguments": m.argument_size_in_bytes,
          "temp": m.temp_size_in_bytes}


def largest_batch(budget: float, measure) -> tuple[int, dict]:
  """The largest batch with peak <= budget: a linear estimate from batches 1 and 2,
  then compiled steps either side of the boundary until it is found."""
  cache = {}

  def peak(b):
    if b not in cache:
      cache[b] = measure(b)
    return cache[b]["peak"]
  slope = peak(2) - peak(1)
  if peak(1) > budget:
    return 0, cache
  b = max(1, int((budget - peak(1)) // slope) + 1)
  while peak(b) > budget and b > 1:
    b -= 1
  while peak(b + 1) <= budget:
    b += 1
  return b, cache


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--device_memory_gib", type=float, default=11.0)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--base_features", type=int, default=64)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--json", action="store_true", help="also print one JSON line")
  args = p.parse_args()
  print(f"U-Net base {args.base_features}, depth {args.depth}, {args.size}x{args.size}x1, "
        f"2 classes, SGD momentum, Dice+CE; device memory {args.device_memory_gib} GiB")
  result = {"device_memory_gib": args.device_memory_gib, "size": args.size, "rows": []}
  for dtype in args.dtypes.split(","):
    measure = functools.partial(step_memory, size=args.size, dtype=dtype,
                                base=args.base_features, depth=args.depth)
    measured = {}
    for fraction in (0.75, 1.0):
      budget = fraction * args.device_memory_gib * GIB
      batch, cache = largest_batch(budget, lambda b: measured.setdefault(b, measure(b)))
      per_slice = (cache[2]["peak"] - cache[1]["peak"]) / GIB
      fixed = cache[1]["peak"] / GIB - per_slice
      row = {"dtype": dtype, "fraction": fraction, "budget_gib": budget / GIB,
             "largest_batch": batch, "peak_gib": cache[batch]["peak"] / GIB if batch else None,
             "next_peak_gib": cache[batch + 1]["peak"] / GIB, "per_slice_gib": per_slice,
             "fixed_gib": fixed}
      result["rows"].append(row)
      print(f"{dtype:8} budget {budget / GIB:5.2f} GiB ({fraction:.0%}): largest batch {batch} "
            f"(peak {row['peak_gib']:.2f} GiB; batch {batch + 1}: {row['next_peak_gib']:.2f} GiB)"
            f"; {per_slice * 1024:.0f} MiB per slice + {fixed * 1024:.0f} MiB fixed")
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
