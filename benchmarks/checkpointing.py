"""Time the training loop spends blocked on checkpointing, and save/restore seconds.

    python benchmarks/checkpointing.py                       # thesis U-Net, 256x256
    python benchmarks/checkpointing.py --steps=30 --every=10

Trains the thesis-size U-Net (depth 4, base 64 features, Adam) on one device with
random 256x256 slices, saving with the training code's Checkpointer every N steps
(asynchronous orbax writes) and once at the end. "Blocked" is the time the loop
spends inside `save` plus the final wait for the last write; its share is of the
whole loop. Then a synchronous save (save + wait) and a restore are timed alone.
"""

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
  p.add_argument("--base_features", type=int, default=64)
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, REPO)
  import jax
  import numpy as np
  from medseg_jax import defaults
  from medseg_jax import optim
  from medseg_jax.training import checkpoint, decisions, losses, state as state_lib, step
  from medseg_jax.models import build_model
  from medseg_jax.parallel import strategies

  cfg = defaults.get_config()
  cfg.model.update({"name": "unet", "depth": 4, "base_features": args.base_features})
  cfg.optim.name = "adam"
  par = strategies.make_parallel("shard_map", 1)
  model = build_model(cfg.model, 2, args.size, par.bn_axis_name)
  tx = optim.make_optimizer(cfg, optim.peak_learning_rate(cfg, args.batch))
  state = par.put_state(state_lib.init_state(model, tx, jax.random.key(0),
                                         (args.size, args.size, 1)))
  params = sum(x.size for x in jax.tree.leaves(state.params))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(par.replicated_state(state)))
  rng = np.random.default_rng(0)
  batch = par.put_batch({
      "image": rng.normal(size=(args.batch, args.size, args.size, 1)).astype("f4"),
      "label": rng.integers(0, 2, (args.batch, args.size, args.size)).astype("i4")})
  step_fn = par.train_step(functools.partial(step.train_step, loss_fn=losses.dice_ce_loss))
  state, m = step_fn(state, batch, jax.random.key(1))  # compile outside the timed loop
  jax.block_until_ready(m)

  workdir = tempfile.mkdtemp(prefix="ckpt_bench_")
  try:
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3)
    blocked, saves, start = 0.0, [], time.perf_counter()
    for step in range(1, args.steps + 1):
      state, m = step_fn(state, batch, jax.random.key(1))
      jax.block_until_ready(state)  # the save below must not wait for the step's compute
      if decisions.periodic(step, args.every):
        t = time.perf_counter()
        ckpt.save(step, par.replicated_state(state), {"step": step})
        saves.append(time.perf_counter() - t)
    t = time.perf_counter()
    ckpt.wait()  # the run's end waits for the last write
    blocked += sum(saves) + time.perf_counter() - t
    total = time.perf_counter() - start

    t = time.perf_counter()
    ckpt.save(args.steps + 1, par.replicated_state(state), {"step": args.steps + 1})
    ckpt.wait()
    sync_save = time.perf_counter() - t
    t = time.perf_counter()
    restored = ckpt.restore(par.replicated_state(state), par.replicated)
    jax.block_until_ready(restored.state.params)
    restore = time.perf_counter() - t
    ckpt.close()
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  print(f"U-Net depth 4 base {args.base_features}: {params / 1e6:.1f}M parameters, "
        f"train state {state_bytes / 2**20:.0f} MiB (params + Adam moments)")
  print(f"{args.steps} steps of batch {args.batch} at {args.size}x{args.size}, checkpoint "
        f"every {args.every}: loop {total:.1f} s, {total / args.steps:.2f} s/step")
  print(f"blocked on checkpointing: {blocked:.3f} s = {100 * blocked / total:.2f}% of the loop "
        f"(median {np.median(saves) * 1e3:.0f} ms per save call, {len(saves)} saves)")
  print(f"save, waited to the end: {sync_save:.2f} s; restore: {restore:.2f} s")


if __name__ == "__main__":
  main()
