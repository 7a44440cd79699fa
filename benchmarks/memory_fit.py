"""The largest per-device batch whose train step fits a device's memory: the thesis U-Net,
or the network, input, optimizer, loss and augmentation of a config file (2D or 3D).

    python benchmarks/memory_fit.py      # --device_memory_gib=11 --size=256 (a GTX 1080 Ti)
    python benchmarks/memory_fit.py --config=configs/unet3d_brats.py --device_memory_gib=16,24,40,80

The memory of one train step (parameters, optimizer state, batch, activations kept
for the backward pass, gradients, temporaries) comes from XLA's buffer assignment of
the compiled step: `compiled.memory_analysis()`, peak = arguments + outputs - donated
aliases + temporaries. No accelerator is needed: the step is compiled for this CPU, so
the figures are XLA:CPU's buffer plan; a GPU's plan differs in fusion and adds the
CUDA context and cuDNN workspaces. The budget is the device memory times JAX's default
preallocated fraction (0.75) and times 1.0 (the whole card).

With --config, the step is the one training builds from that config: its network
(`model.*`), one example of `data.image_size` slices or `data.patch_size` patches
(`data.spatial_dims`), its optimizer state, loss and on-device augmentation; the class
count and channels are those of `data.label_map` and `data.modalities`, as the config
check assumes. The batch is per device (a data-parallel step on N devices holds N times
it globally). Each dtype of --dtypes is the compute dtype (`model.compute_dtype`); the
parameters, gradients and optimizer state stay float32, as in training.
"""

import argparse
import functools
import json
import os
import sys

import ml_collections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30


def thesis_config(size: int, base: int, depth: int) -> ml_collections.ConfigDict:
  """configs/base.py with the thesis U-Net at `size`x`size`: SGD with momentum, Dice + CE,
  no augmentation."""
  sys.path.insert(0, REPO)
  from medseg_jax import defaults
  cfg = defaults.get_config()
  cfg.model.update({"name": "unet", "base_features": base, "depth": depth})
  cfg.data.image_size = size
  return cfg


def example_shape(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """One training example (slice or patch, channels last) of `cfg`."""
  sys.path.insert(0, REPO)
  from medseg_jax import kinds
  return kinds.from_config(cfg).input_shape(len(cfg.data.modalities) or 1)


def step_memory(batch: int, cfg: ml_collections.ConfigDict, dtype: str) -> float:
  """XLA's memory analysis of the compiled train step of `cfg` at per-device `batch`
  (medseg_jax/planning/memory.py, which the planner fits plans with)."""
  sys.path.insert(0, REPO)
  from medseg_jax.planning import memory

  cfg = cfg.copy_and_resolve_references()
  cfg.model.compute_dtype = dtype
  num_classes = max(cfg.data.label_map) + 1 if cfg.data.label_map else 2
  return memory.step_peak(cfg, batch, num_classes, len(cfg.data.modalities) or 1)


def residual_bytes(batch: int, cfg: ml_collections.ConfigDict, dtype: str) -> dict[str, int]:
  """Bytes by dtype of what differentiation keeps from the forward pass for the backward
  pass (the leaves of `jax.vjp`'s closure), before any compiler: this shows what a compute
  dtype saves where XLA:CPU's plan cannot (it runs bfloat16 arithmetic in float32)."""
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  from medseg_jax.models import build_model
  from medseg_jax.training import losses

  cfg = cfg.copy_and_resolve_references()
  cfg.model.compute_dtype = dtype
  num_classes = max(cfg.data.label_map) + 1 if cfg.data.label_map else 2
  model = build_model(cfg.model, num_classes, cfg.data.image_size)
  loss_fn = losses.get_loss(cfg.train.loss)
  example = example_shape(cfg)

  def kept(images, labels):
    params = model.init(jax.random.key(0), images[:1])["params"]
    objective = lambda p: jnp.mean(loss_fn(model.apply({"params": p}, images, train=True),
                                           labels))
    return jax.vjp(objective, params)[1]
  leaves = jax.tree.leaves(jax.eval_shape(
      kept, jax.ShapeDtypeStruct((batch,) + example, jnp.float32),
      jax.ShapeDtypeStruct((batch,) + example[:-1], jnp.int32)))
  sizes = {}
  for leaf in leaves:
    sizes[str(leaf.dtype)] = sizes.get(str(leaf.dtype), 0) + leaf.size * leaf.dtype.itemsize
  return sizes


def residuals_per_example(cfg: ml_collections.ConfigDict, dtype: str) -> dict[str, float]:
  """MiB per example, by dtype, kept for the backward pass (batch 2 minus batch 1)."""
  one, two = residual_bytes(1, cfg, dtype), residual_bytes(2, cfg, dtype)
  return {k: (two[k] - one.get(k, 0)) / 2**20 for k in two}


def fit_rows(measure, dtype: str, memories: list[float], search: str) -> list[dict]:
  """The largest batch of `dtype` for 75% and 100% of every device memory; the compiled
  steps are shared between budgets."""
  sys.path.insert(0, REPO)
  from medseg_jax.planning import memory
  budgets = [fraction * gib * GIB for gib in memories for fraction in (0.75, 1.0)]
  compiled = {}
  memo = lambda b: compiled[b] if b in compiled else compiled.setdefault(b, measure(b))
  if search == "interpolated":
    batches, cache = memory.interpolated_batches(budgets, memo)
  else:
    batches, cache = [], {}
    for budget in budgets:
      batch, found = memory.largest_batch(budget, memo)
      batches.append(batch)
      cache.update(found)
  for b in (1, 2, *(b + 1 for b in batches)):
    if b not in cache:
      cache[b] = memo(b)
  per_example = (cache[2] - cache[1]) / GIB
  fixed = cache[1] / GIB - per_example
  rows = []
  for budget, batch in zip(budgets, batches):
    memory, fraction = (memories[len(rows) // 2], (0.75, 1.0)[len(rows) % 2])
    row = {"dtype": dtype, "device_memory_gib": memory, "fraction": fraction,
           "budget_gib": budget / GIB, "largest_batch": batch,
           "peak_gib": cache[batch] / GIB if batch else None,
           "next_peak_gib": cache[batch + 1] / GIB,
           "compiled": [b for b in (batch, batch + 1) if b in compiled],
           "per_slice_gib": per_example, "fixed_gib": fixed}
    rows.append(row)
    peak = f"{row['peak_gib']:.2f}" if batch else "-"
    print(f"{dtype:8} budget {budget / GIB:5.2f} GiB ({fraction:.0%} of {memory:g}): "
          f"largest batch {batch} (peak {peak} GiB; batch {batch + 1}: "
          f"{row['next_peak_gib']:.2f} GiB); {per_example * 1024:.0f} MiB per example + "
          f"{fixed * 1024:.0f} MiB fixed", flush=True)
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--device_memory_gib", default="11",
                 help="device memories in GiB, comma-separated (e.g. 16,24,40,80)")
  p.add_argument("--config", default="",
                 help="a config file (configs/unet3d_brats.py): its network, input, optimizer, "
                      "loss and augmentation; --size, --base_features and --depth are unused")
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--base_features", type=int, default=64)
  p.add_argument("--depth", type=int, default=4)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--cpu_shifted_gradient", action="store_true",
                 help="3D: keep the CPU backend's shifted kernel gradients "
                      "(models/conv3d_cpu.py), which this CPU trains with; by default every "
                      "convolution is XLA's own, as a GPU runs it")
  p.add_argument("--search", choices=("exact", "interpolated"), default="exact",
                 help="exact: compile the batches either side of every budget's boundary; "
                      "interpolated: only those of the largest budget (and batches 1, 2), "
                      "the peaks between interpolated")
  p.add_argument("--json", action="store_true", help="also print one JSON line")
  args = p.parse_args()
  sys.path.insert(0, REPO)
  from medseg_jax import config_schema
  from medseg_jax.models import conv3d_cpu
  if not args.cpu_shifted_gradient:
    conv3d_cpu.MAX_VOXELS = 0  # use_shifted then never applies: XLA's convolutions only
  memories = [float(m) for m in args.device_memory_gib.split(",")]
  cfg = (config_schema.load_config(args.config) if args.config
         else thesis_config(args.size, args.base_features, args.depth))
  example = example_shape(cfg)
  m = cfg.model
  print(f"{args.config or 'thesis U-Net'}: {m.name} base {m.base_features}, depth {m.depth}, "
        f"norm {m.norm}, example {'x'.join(map(str, example))}, optimizer {cfg.optim.name}, "
        f"loss {cfg.train.loss}, augmentation {'on' if cfg.data.augment.enabled else 'off'}; "
        f"device memory {args.device_memory_gib} GiB", flush=True)
  result = {"config": args.config, "device_memory_gib": memories, "size": args.size,
            "search": args.search, "example": list(example), "rows": []}
  for dtype in args.dtypes.split(","):
    measure = functools.partial(step_memory, cfg=cfg, dtype=dtype)
    kept = residuals_per_example(cfg, dtype)
    result.setdefault("kept_mib_per_example", {})[dtype] = kept
    print(f"{dtype:8} kept for the backward pass: {sum(kept.values()):.1f} MiB per example ("
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kept.items())) + ")", flush=True)
    result["rows"] += fit_rows(measure, dtype, memories, args.search)
  if args.json:
    print(json.dumps(result))


if __name__ == "__main__":
  main()
