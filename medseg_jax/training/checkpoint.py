"""Checkpoints with orbax: the train state and where training stands, restored on restart.

A checkpoint has two items: `state` (step, params, norm statistics, optimizer state)
and `meta` (JSON: the loader position, the rng, the global batch and device count it
was saved with, and the resolved config). Writing is asynchronous; orbax finalises a
step only once every file is written, so a run killed mid-write leaves no step behind.
"""

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from medseg_jax.parallel import multihost, strategies
from medseg_jax.errors import ConfigError, MedsegError, first_line

STATE, META = "state", "meta"
# Model keys that say where a fresh run's weights came from, not what the model is.
_NOT_THE_MODEL = ("model.init_from", "model.init_checkpoint")


def _to_tree(state) -> dict:
  return {"step": state.step, "params": state.params, "model_state": state.model_state,
          "opt_state": state.opt_state}


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def has_checkpoint(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds at least one step (a run to resume)."""
  path = directory(workdir)
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def require_checkpoint(workdir: str) -> None:
  """Raises a one-line error unless WORKDIR/checkpoints holds at least one step."""
  if not has_checkpoint(workdir):
    raise MedsegError(f"{directory(workdir)}: no checkpoint (train first, or check --workdir)")


def remove_all(workdir: str) -> None:
  """Deletes the run's checkpoints (latest and best), for a run that starts over."""
  if jax.process_index() == 0:
    for path in (directory(workdir), directory(workdir) + "_best"):
      shutil.rmtree(path, ignore_errors=True)
  multihost.barrier("checkpoints removed")


def check_config(meta: dict | None, cfg: ml_collections.ConfigDict, where: str) -> None:
  """Refuses a checkpoint of another model; logs every other setting that changed."""
  if not meta or "config" not in meta:
    return
  saved = _flatten(meta["config"])
  now = _flatten(json.loads(json.dumps(cfg.to_dict())))  # tuples become lists, as saved
  changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
  for key in changed:
    if key.startswith("model.") and key not in _NOT_THE_MODEL:
      raise ConfigError(f"{key}: {now.get(key)!r} in the config but {saved.get(key)!r} in the "
                        f"checkpoints in {where} (use another --workdir, or --from_scratch)")
  if changed:
    logging.warning("Settings changed since the checkpoint: %s", ", ".join(
        f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in changed))


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


@dataclasses.dataclass
class Restored:
  step: int
  state: Any   # the TrainState given to `restore`, with the checkpoint's arrays
  meta: dict


class Checkpointer:
  """Saves and restores a TrainState with its `meta` dictionary.

  The newest `max_to_keep` go to WORKDIR/checkpoints; the one with the best
  validation Dice so far is kept apart in WORKDIR/checkpoints_best.
  """

  def __init__(self, workdir: str, max_to_keep: int):
    self.directory = directory(workdir)
    # Both managers may save the same step at once (a validation and a checkpoint on one
    # step). With several processes, orbax names its barriers after the operation and at
    # most the step (async_write_complete.<step>, set_value_start, ...), and waits on some
    # in background threads: two managers sharing those names aborted or hung the run
    # ("Barrier ... is already ongoing"). A prefix per manager makes every name unique
    # and keeps the two saves concurrent; one manager's saves never overlap (each waits
    # for the one before), and the main-thread barriers run in the same order everywhere.
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             multiprocessing_options=_barrier_prefix("latest")))
    self._best = ocp.CheckpointManager(
        self.directory + "_best",
        options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["dice"],
                                             best_mode="max", create=True,
                                             multiprocessing_options=_barrier_prefix("best")))
    # The best Dice is kept here, not read back with `metrics()`: that reads the file of
    # a save that may still be in flight (None until it is written), and a decision read
    # from disk could differ between processes, which must all save or all skip.
    best = self._best.best_step()
    self._best_dice = None if best is None else float(self._best.metrics(best)["dice"])

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    return self._best.best_step()

  def restore(self, state: Any, sharding, step: int | None = None,
              best: bool = False) -> Restored:
    """`state` with its arrays read from the checkpoint at `step`, or the best one.

    Without a step, the newest readable checkpoint: one that cannot be read (truncated
    or missing files) is skipped with a warning, and the one before it is tried.
    """
    manager = self._best if best else self._manager
    if step is None and best:
      step = manager.best_step()
    if step is None and not best:
      return self._restore_newest(state, sharding)
    if step is None:
      raise MedsegError(f"{manager.directory}: no checkpoint (the best is kept once a "
                        "validation has run)")
    if step not in manager.all_steps():
      raise MedsegError(f"{manager.directory}: no checkpoint at step {step} "
                        f"(have {sorted(manager.all_steps())})")
    try:
      return self._read(manager, step, state, sharding)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      raise MedsegError(f"{manager.directory}/{step}: unreadable checkpoint "
                        f"({first_line(e)})") from e

  def _restore_newest(self, state: Any, sharding) -> Restored:
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise MedsegError(f"{self.directory}: no checkpoint (train first, or check --workdir)")
    for index, step in enumerate(steps):
      try:
        restored = self._read(self._manager, step, state, sharding)
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        logging.warning("Skipping unreadable checkpoint %s/%d: %s", self.directory, step,
                        first_line(e))
        continue
      for unreadable in steps[:index]:  # training writes these steps again
        self._manager.delete(unreadable)
      return restored
    raise MedsegError(f"{self.directory}: none of the checkpoints {sorted(steps)} can be read; "
                      "pass --from_scratch to start over")

  def _read(self, manager: ocp.CheckpointManager, step: int, state: Any,
            sharding) -> Restored:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            _to_tree(state))
    tree = manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}))
    logging.info("Restored checkpoint %s/%d", manager.directory, step)
    return Restored(step=step, state=state.replace(**tree[STATE]), meta=dict(tree[META]))

  def read_meta(self, step: int | None = None, best: bool = False) -> dict | None:
    """The `meta` item of a checkpoint (the newest readable, or the best, if None), or None."""
    manager = self._best if best else self._manager
    if step is None and best:
      step = manager.best_step()
    for candidate in ([step] if step is not None else
                      sorted(manager.all_steps(), reverse=True)):
      try:
        return dict(manager.restore(
            candidate, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])
      except Exception:  # pylint: disable=broad-except  (the full restore reports it)
        continue
    return None

  def save_if_best(self, step: int, state: Any, meta: dict, dice: float) -> bool:
    """Keeps `state` as the best checkpoint if `dice` beats the best so far."""
    if self._best.best_step() == step or (self._best_dice is not None
                                          and self._best_dice >= dice):
      return False
    saved = self._best.save(step, args=_save_args(state, meta), metrics={"dice": float(dice)},
                            force=True)
    if saved:
      self._best_dice = float(dice)
    return saved

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Saves `state` as `step` unless that step is saved; writing continues in the background."""
    if self._manager.latest_step() == step:
      return False
    return self._manager.save(step, args=_save_args(state, meta), force=True)

  def wait(self) -> None:
    """Blocks until every checkpoint started so far is on disk."""
    for manager in (self._manager, self._best):
      manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    for manager in (self._manager, self._best):
      manager.close()


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"checkpoints_{name}")


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(**{STATE: ocp.args.StandardSave(_to_tree(state)),
                               META: ocp.args.JsonSave(meta)})


def restore_state(cfg: ml_collections.ConfigDict, workdir: str, which: str,
                  par: strategies.Parallel, template: Any) -> Any:
  """--mode=evaluate|predict: the checkpoint `which` ('latest', 'best' or a step) of the
  run in `workdir`, read into the shape of `template` and placed on the mesh, after
  checking `cfg` against that checkpoint's own config.

  The check comes before the restore: a checkpoint of another model would otherwise fail
  as unreadable (and a 'latest' one be deleted as corrupt).
  """
  require_checkpoint(workdir)
  checkpointer = Checkpointer(workdir, cfg.checkpoint.max_to_keep)
  try:
    best = which == "best"
    step = None if which in ("latest", "best") else int(which)
    where = checkpointer.directory + ("_best" if best else "")
    meta = checkpointer.read_meta(step, best=best)
    check_config(meta, cfg, where)
    restored = checkpointer.restore(template, par.replicated, step, best=best)
    if meta is None or meta.get("step") != restored.step:  # 'latest' fell back to an older one
      check_config(restored.meta, cfg, where)
  finally:
    checkpointer.close()
  return par.put_state(restored.state)

