"""One of two processes that save a best and a periodic checkpoint of the same steps.

    python tests/checkpoint_pair.py PORT PROCESS_ID WORKDIR STEPS

Run by tests/test_multiprocess.py as two real jax.distributed processes on 127.0.0.1.
Every step does what the training loop does when a validation and a checkpoint land
on the same step: `save_if_best` (the Dice, step / 100, rises every step, so it always
saves), then `save` (the step is saved already), asynchronously. The parameters of
step s are all s, so a test can check what was written against that hand-computed value.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  (after the environment is set)
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from medseg_jax.training import checkpoint  # noqa: E402
from medseg_jax.parallel import distributed, multihost, strategies  # noqa: E402
from medseg_jax.training.state import TrainState  # noqa: E402


def main(port: str, process_id: str, workdir: str, steps: str) -> None:
  launch = distributed.Launch("flags", f"127.0.0.1:{port}", 2, int(process_id))
  distributed.initialize(launch, None, timeout_seconds=60)
  par = strategies.make_parallel("shard_map")
  state = TrainState.create(apply_fn=None, params={"w": jnp.zeros((256,), jnp.float32)},
                            model_state={}, tx=optax.sgd(0.1))
  checkpointer = checkpoint.Checkpointer(workdir, max_to_keep=3)
  for step in range(1, int(steps) + 1):
    state = par.put_state(state.replace(step=jnp.asarray(step, jnp.int32),
                                        params={"w": jnp.full((256,), step, jnp.float32)}))
    meta = {"step": step}
    checkpointer.save_if_best(step, state, meta, dice=step / 100)
    checkpointer.save(step, state, meta)
  checkpointer.close()
  multihost.barrier("checkpoint pair done")


if __name__ == "__main__":
  main(*sys.argv[1:])
