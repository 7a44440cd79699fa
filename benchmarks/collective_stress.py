"""XLA:CPU collectives on 8 simulated devices beside busy processes: an all-reduce step
dispatched STEPS times without reading a result, each repetition its own process,
through the strategies' in-flight bound (`parallel/in_flight.py`) or, with --unbounded,
without it. Counts the repetitions that finish, and the aborts ("Expected 8 threads to
join the rendezvous").

    python3 benchmarks/collective_stress.py --repetitions=50 --busy=2
    python3 benchmarks/collective_stress.py --repetitions=3 --busy=2 --unbounded
"""

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8


def worker(steps: int, bounded: bool) -> None:
  """STEPS data-parallel SGD steps of a linear layer with a pmean'd gradient."""
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from medseg_jax.parallel import strategies  # pylint: disable=import-outside-toplevel

  par = strategies.make_parallel("shard_map", DEVICES)
  def step(state, batch, rng, reduce_mean):
    del rng
    grad = batch["x"].T @ jnp.tanh(batch["x"] @ state) / batch["x"].shape[0]
    return state - 0.01 * reduce_mean(grad), {"loss": reduce_mean(jnp.mean(grad))}
  compiled = par.train_step(step)
  if bounded:
    compiled = par.in_flight.wrap(compiled)
  state = par.put_state(jnp.full((64, 64), 0.01))
  batch = par.put_batch({"x": jnp.ones((DEVICES * 16, 64))})
  rng = jax.random.key(0)
  for _ in range(steps):
    state, metrics = compiled(state, batch, rng)
  print(float(metrics["loss"]), flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--repetitions", type=int, default=50)
  parser.add_argument("--busy", type=int, default=2, help="busy-looping processes beside")
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--timeout", type=float, default=120)
  parser.add_argument("--unbounded", action="store_true")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.steps, not args.unbounded)
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
  busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(args.busy)]
  finished, aborted, hung, seconds = 0, 0, 0, []
  try:
    for _ in range(args.repetitions):
      started = time.perf_counter()
      command = [sys.executable, os.path.abspath(__file__), "--worker",
                 f"--steps={args.steps}"] + (["--unbounded"] if args.unbounded else [])
      try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
      except subprocess.TimeoutExpired:
        hung += 1
        continue
      seconds.append(time.perf_counter() - started)
      if proc.returncode == 0:
        finished += 1
      elif "threads to join the rendezvous" in proc.stderr:
        aborted += 1
  finally:
    for p in busy:
      p.kill()
  print(f"{'unbounded' if args.unbounded else 'bounded'}, {args.busy} busy processes, "
        f"{args.steps} steps: {finished}/{args.repetitions} finished, {aborted} aborted in "
        f"the rendezvous, {hung} hung past {args.timeout:g} s; median "
        f"{sorted(seconds)[len(seconds) // 2] if seconds else float('nan'):.1f} s")


if __name__ == "__main__":
  main()
