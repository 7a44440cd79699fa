"""The bound on queued all-reduce steps on XLA:CPU: steps dispatched without reading a
result finish (unbounded, the same loop hangs in XLA's rendezvous: benchmarks/
collective_stress.py --unbounded), and give what reading each step gives."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from helpers import REPO, env_with_devices
from medseg_jax.parallel import in_flight, strategies

STRESS = os.path.join(REPO, "benchmarks", "collective_stress.py")
STEPS = 500  # dispatched at once: far past the CPU client's 32 queued per device


def _step(state, batch, rng, reduce_mean):
  """The stress worker's step (benchmarks/collective_stress.py)."""
  del rng
  grad = batch["x"].T @ jnp.tanh(batch["x"] @ state) / batch["x"].shape[0]
  return state - 0.01 * reduce_mean(grad), {"loss": reduce_mean(jnp.mean(grad))}


def test_queued_all_reduce_steps_finish_with_the_loss_of_steps_read_one_by_one(devices8):
  proc = subprocess.run([sys.executable, STRESS, "--worker", f"--steps={STEPS}"],
                        env=env_with_devices(8), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  par = strategies.make_parallel("shard_map", 8)
  compiled = par.train_step(_step)
  state = par.put_state(jnp.full((64, 64), 0.01))
  batch = par.put_batch({"x": jnp.ones((8 * 16, 64))})
  for _ in range(STEPS):
    state, metrics = jax.block_until_ready(compiled(state, batch, jax.random.key(0)))
  assert float(proc.stdout) == float(metrics["loss"])


def test_the_steps_of_a_mesh_share_one_queue_of_at_most_limit(devices8):
  par = strategies.make_parallel("shard_map", 8)
  train = par.in_flight.wrap(par.train_step(_step))
  double = par.in_flight.wrap(jax.jit(lambda x: 2 * x))
  state = par.put_state(jnp.full((64, 64), 0.01))
  batch = par.put_batch({"x": jnp.ones((8 * 16, 64))})
  for _ in range(3 * in_flight.LIMIT):
    state, metrics = train(state, batch, jax.random.key(0))
    double(metrics["loss"])
    assert len(par.in_flight._queue) <= in_flight.LIMIT  # pylint: disable=protected-access
  one = strategies.make_parallel("shard_map", 1)
  step = one.train_step(_step)
  assert one.in_flight.wrap(step) is step  # no rendezvous on one device
