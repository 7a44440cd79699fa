"""One of two processes that agree, round after round, on the step to stop after.

    python tests/stop_pair.py PORT PROCESS_ID ROUNDS

Run by tests/test_multiprocess.py as two real jax.distributed processes on 127.0.0.1.
Each step dispatches a computation with an all-reduce over both processes' devices, so a
process can wait for its result only once the other has dispatched the same step. The
processes differ the way training loops do: one waits for its result every step, the
other lets its steps queue up on the device for many steps, and one sleeps (a slow
host). In each round one process asks for a stop at a step drawn from the round's seed
(the same draw in both). Each process prints `round R: stopped after step S (both: A B)`,
where A and B are the steps the two processes stopped after, gathered at the end of the
round.
"""

import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the environment is set)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from medseg_jax.parallel import distributed, multihost  # noqa: E402


@jax.jit
def _step(x):
  return 0.5 * x + jnp.mean(x)  # the mean is an all-reduce over every device


def _round(index: int, x: jax.Array, start: int) -> tuple[int, jax.Array]:
  """Steps until the stop agreed in round `index`; the last step and the state."""
  me = jax.process_index()
  draw = np.random.default_rng(index)
  asker, ask_at = int(draw.integers(2)), start + int(draw.integers(1, 40))
  fetch_every = (1, int(draw.integers(10, 60)))[(me + index) % 2]  # who runs ahead alternates
  sleep = 0.01 if me == index % 2 else 0.0
  step = start
  with multihost.SharedStop(start, name=f"round{index}") as stop:
    while True:
      step += 1
      x = _step(x)
      if step % fetch_every == 0:
        x.block_until_ready()
      time.sleep(sleep)
      if me == asker and step == ask_at:
        stop.ask(f"round {index}")
      if stop.reached(step):
        return step, x


def main(port: str, process_id: str, rounds: str) -> None:
  launch = distributed.Launch("flags", f"127.0.0.1:{port}", 2, int(process_id))
  distributed.initialize(launch, None, timeout_seconds=60)
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("d",)), PartitionSpec("d"))
  x = jax.make_array_from_process_local_data(sharding, np.ones(2, np.float32))
  step = 0
  for index in range(int(rounds)):
    step, x = _round(index, x, step)
    both = multihost.all_processes(np.array([step]))[:, 0]
    print(f"round {index}: stopped after step {step} (both: {both[0]} {both[1]})", flush=True)
  multihost.barrier("stop pair done")


if __name__ == "__main__":
  main(*sys.argv[1:])
