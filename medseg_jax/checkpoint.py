"""Checkpoints with orbax: the train state every N steps and at the end, resumed on restart."""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from medseg_jax.errors import MedsegError


def _to_tree(state) -> dict:
  return {"step": state.step, "params": state.params, "model_state": state.model_state,
          "opt_state": state.opt_state}


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def require_checkpoint(workdir: str) -> None:
  """Raises a one-line error unless WORKDIR/checkpoints holds at least one step."""
  path = directory(workdir)
  if not os.path.isdir(path) or not any(name.isdigit() for name in os.listdir(path)):
    raise MedsegError(f"{path}: no checkpoint (train first, or check --workdir)")


class Checkpointer:
  """Saves and restores the arrays of a TrainState in WORKDIR/checkpoints."""

  def __init__(self, workdir: str, every_steps: int, max_to_keep: int):
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self.directory = directory(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, state: Any, sharding, step: int | None = None) -> Any:
    """Returns `state` with its arrays read from the checkpoint at `step` (latest if None)."""
    step = self._manager.latest_step() if step is None else step
    if step not in self._manager.all_steps():
      raise MedsegError(f"{self.directory}: no checkpoint at step {step} "
                        f"(have {sorted(self._manager.all_steps())})")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            _to_tree(state))
    tree = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    logging.info("Restored checkpoint %s/%d", self.directory, step)
    return state.replace(**tree)

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Saves every `every_steps` steps (or when forced); writing continues in the background."""
    due = force or (self.every_steps > 0 and step % self.every_steps == 0)
    if not due or self._manager.latest_step() == step:
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=True)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
