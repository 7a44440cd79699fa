"""Compile time, median step time and slices/s of the U-Net and FCN train step.

    python benchmarks/train_step.py                # 1 device, then each strategy on 8 fake CPU devices
    python benchmarks/train_step.py --devices=8    # one setting (sets XLA_FLAGS itself)

The global batch is the same for every device count, so the figures compare the
cost of splitting one step over devices.
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name -> model overrides
    "unet": {"name": "unet", "depth": 4, "base_features": 16},
    "fcn": {"name": "fcn", "base_features": 16, "fc_features": 256},
}


def measure(devices: int, size: int, global_batch: int, steps: int, strategy: str) -> list[dict]:
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from medseg_jax import defaults
  from medseg_jax import optim
  from medseg_jax.training import losses, state as state_lib, step
  from medseg_jax.models import build_model
  from medseg_jax.parallel import strategies

  results = []
  for name, overrides in MODELS.items():
    cfg = defaults.get_config()
    cfg.model.update(overrides)
    cfg.train.per_device_batch_size = global_batch // devices
    par = strategies.make_parallel(strategy, devices)
    model = build_model(cfg.model, 2, size, par.bn_axis_name)
    tx = optim.make_optimizer(cfg, optim.peak_learning_rate(cfg, global_batch))
    state = par.put_state(state_lib.init_state(model, tx, jax.random.key(0), (size, size, 1)))
    rng = np.random.default_rng(0)
    batch = par.put_batch({"image": rng.normal(size=(global_batch, size, size, 1)).astype("f4"),
                           "label": rng.integers(0, 2, (global_batch, size, size)).astype("i4")})
    step_fn = par.train_step(functools.partial(step.train_step, loss_fn=losses.dice_ce_loss))
    start = time.perf_counter()
    state, m = step(state, batch, jax.random.key(1))
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, m = step(state, batch, jax.random.key(1))
      jax.block_until_ready(m)
      times.append(time.perf_counter() - start)
    median = float(np.median(times))
    results.append({"model": name, "devices": devices, "strategy": strategy, "size": size,
                    "global_batch": global_batch, "compile_s": compile_s,
                    "median_step_s": median, "slices_per_s": global_batch / median})
  return results


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=0, help="0 = run 1 and 8 in subprocesses")
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--global_batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--strategy", default="", help="one strategy; default: each on 8 devices")
  p.add_argument("--json", action="store_true", help="print JSON lines only")
  args = p.parse_args()
  if args.devices:
    for r in measure(args.devices, args.size, args.global_batch, args.steps,
                     args.strategy or "shard_map"):
      print(json.dumps(r))
    return
  rows = []
  settings = [(1, args.strategy or "shard_map")] + [
      (8, s) for s in ([args.strategy] if args.strategy else ["shard_map", "pmap", "gspmd"])]
  for devices, strategy in settings:
    cmd = [sys.executable, __file__, f"--devices={devices}", f"--size={args.size}",
           f"--global_batch={args.global_batch}", f"--steps={args.steps}",
           f"--strategy={strategy}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
  print(f"{'model':6} {'devices':>7} {'strategy':>9} {'size':>5} {'batch':>5} "
        f"{'compile s':>9} {'median step s':>13} {'slices/s':>8}")
  for r in rows:
    print(f"{r['model']:6} {r['devices']:>7} {r['strategy']:>9} {r['size']:>5} "
          f"{r['global_batch']:>5} {r['compile_s']:>9.2f} {r['median_step_s']:>13.3f} "
          f"{r['slices_per_s']:>8.1f}")


if __name__ == "__main__":
  main()
