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
  """Saves and restores the arrays of a TrainState.

  The newest `max_to_keep` go to WORKDIR/checkpoints; the one with the best
  validation Dice so far is kept apart in WORKDIR/checkpoints_best.
  """

  def __init__(self, workdir: str, every_steps: int, max_to_keep: int):
    self.every_steps = every_steps
    self.directory = directory(workdir)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                             create=True))
    self._best = ocp.CheckpointManager(
        self.directory + "_best",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["dice"],
                                             best_mode="max", create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._best.best_step()

  def restore(self, state: Any, sharding, step: int | None = None, best: bool = False) -> Any:
    """`state` with its arrays read from the checkpoint at `step` (newest if None).

    With `best`, reads the checkpoint with the best validation Dice instead.
    """
    manager = self._best if best else self._manager
    step = (manager.best_step() if best else manager.latest_step()) if step is None else step
    if step is None:
      raise MedsegError(f"{manager.directory}: no checkpoint"
                        + (" (the best is kept once a validation has run)" if best else ""))
    if step not in manager.all_steps():
      raise MedsegError(f"{manager.directory}: no checkpoint at step {step} "
                        f"(have {sorted(manager.all_steps())})")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            _to_tree(state))
    tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    logging.info("Restored checkpoint %s/%d", manager.directory, step)
    return state.replace(**tree)

  def save_if_best(self, step: int, state: Any, dice: float) -> bool:
    """Keeps `state` as the best checkpoint if `dice` beats the best so far."""
    best = self._best.best_step()
    if best is not None and (best == step or self._best.metrics(best)["dice"] >= dice):
      return False
    return self._best.save(step, args=ocp.args.StandardSave(_to_tree(state)),
                           metrics={"dice": float(dice)}, force=True)

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any) -> bool:
    """Saves `state` as `step` unless that step is saved; writing continues in the background."""
    if self._manager.latest_step() == step:
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=True)

  def close(self) -> None:
    for manager in (self._manager, self._best):
      manager.wait_until_finished()
      manager.close()
