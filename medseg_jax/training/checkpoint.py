"""Checkpoints with orbax: the train state and where training stands, restored on restart.

The one place that knows the layout: a checkpoint is a step directory
WORKDIR/checkpoints/<step> with two items, `state` (step, params, norm statistics,
optimizer state) and `meta` (JSON: the loader position, the rng, the global batch and
device count it was saved with, and the resolved config). A step saved because its
validation Dice beat every earlier one also has orbax's `metrics` item ({"dice": ...}).
One orbax CheckpointManager writes them in the background and, by orbax's preservation
policies, keeps the newest `checkpoint.max_to_keep` steps and the best one. orbax
finalises a step only once every file is written, so a run killed mid-write leaves no
step behind; the training run removes such unfinished writes when it starts.
"""

import contextlib
import dataclasses
import glob
import os
import shutil
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from medseg_jax import files
from medseg_jax.errors import ConfigError, MedsegError, first_line
from medseg_jax.parallel import multihost
from medseg_jax.training import orbax_reports

DIRECTORY = "checkpoints"
STATE, META = "state", "meta"
LATEST, BEST = "latest", "best"
_DICE = "dice"
# Room a save asks for beyond its arrays' bytes: orbax's metadata files and the meta item.
_SAVE_MARGIN, _SAVE_SLACK = 1.1, 2**20
# A failed save's unfinished step is removed until it has stayed away this long (seconds),
# giving up after the limit: see `remove_unfinished`.
_SETTLE_S, _SETTLE_LIMIT_S = 1.0, 20.0


def parse_which(value: Any, name: str) -> str | int:
  """'latest', 'best' or a step number (an int): which checkpoint `name` asks for."""
  text = str(value)
  if text in (LATEST, BEST):
    return text
  if text.isdigit():
    return int(text)
  raise ConfigError(f"{name}={text!r}: use 'latest', 'best' or a step number")


def directory(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), DIRECTORY)


def has_checkpoint(workdir: str) -> bool:
  """Whether WORKDIR/checkpoints holds at least one step (a run to resume)."""
  path = directory(workdir)
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def require_checkpoint(workdir: str) -> None:
  """Raises a one-line error unless WORKDIR/checkpoints holds at least one step."""
  if not has_checkpoint(workdir):
    raise MedsegError(f"{directory(workdir)}: no checkpoint (train first, or check --workdir)")


def remove_unfinished(checkpoints: str) -> None:
  """Removes the unfinished steps (orbax's `*.orbax-checkpoint-tmp*`) in `checkpoints`,
  also the directories a failed save's late writes recreate (`files.remove_until_gone`)."""
  pattern = os.path.join(glob.escape(checkpoints), "*.orbax-checkpoint-tmp*")
  if files.remove_until_gone(pattern, _SETTLE_S, _SETTLE_LIMIT_S):
    logging.warning("Could not remove the unfinished checkpoints in %s", checkpoints)


def remove_all(workdir: str) -> None:
  """Deletes the run's checkpoints, for a run that starts over."""
  if jax.process_index() == 0:
    shutil.rmtree(directory(workdir), ignore_errors=True)
  multihost.barrier("checkpoints removed")


def step_directory(path: str, which: str | int) -> str:
  """The step directory that `which` names in `path`: a run directory, its checkpoints
  directory, or one step's directory (returned as it is)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, STATE)):
    return path
  run = os.path.dirname(path) if os.path.basename(path) == DIRECTORY else path
  if not os.path.isdir(directory(run)):
    raise MedsegError(f"{path}: no checkpoints (neither a run directory nor a "
                      "checkpoints directory of this project)")
  reader = Checkpointer(run)
  try:
    return os.path.join(reader.directory, str(reader.step(which)))
  finally:
    reader.close()


def read_state_tree(step_dir: str, arrays: bool = True) -> dict:
  """The `state` item of a step directory as numpy arrays (or only its metadata: the
  tree's paths and shapes), read by this process alone."""
  orbax_reports.quiet()
  # The step directory as orbax wrote it: its items, and the step's metadata beside them.
  reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      **{STATE: ocp.PyTreeCheckpointHandler(), META: ocp.JsonCheckpointHandler()}))
  try:
    metadata = reader.metadata(step_dir).item_metadata[STATE].tree
    if not arrays:
      return metadata
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return reader.restore(step_dir, args=ocp.args.Composite(**{
        STATE: ocp.args.PyTreeRestore(restore_args=restore_args)}))[STATE]
  except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
    raise MedsegError(f"{step_dir}: unreadable checkpoint ({first_line(e, 200)})") from e
  finally:
    reader.close()


@dataclasses.dataclass
class Restored:
  step: int
  state: Any   # the TrainState given to `restore`, with the checkpoint's arrays
  meta: dict


class Checkpointer:
  """Saves and restores a TrainState with its `meta` dictionary in WORKDIR/checkpoints.

  A training run passes `max_to_keep`: the newest `max_to_keep` steps and the step with
  the best validation Dice are kept (orbax's LatestN and BestN; a step saved without a
  Dice is never the best), and writes an earlier run left unfinished are removed.
  Without it the checkpoints are only read (and an unreadable 'latest' deleted).
  """

  def __init__(self, workdir: str, max_to_keep: int | None = None):
    self.directory = directory(workdir)
    orbax_reports.quiet()
    self._manager = ocp.CheckpointManager(self.directory, options=_options(max_to_keep))
    # The best Dice is kept here, not read back with `metrics()` at each validation: that
    # reads the file of a save that may still be in flight, and every process must take
    # the same decision (all save or all skip) from the same value.
    self._best_dice = self._saved_best_dice()

  def _saved_best_dice(self) -> float | None:
    best = self._manager.best_step()
    return None if best is None else _dice(self._manager.metrics(best))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best validation Dice, None before the first validation."""
    return self._manager.best_step()

  def step(self, which: str | int) -> int:
    """The saved step that `which` ('latest', 'best' or a step number) names."""
    if which == BEST:
      best = self._manager.best_step()
      if best is None:
        raise MedsegError(f"{self.directory}: no best checkpoint (kept once a validation "
                          "has run)")
      return best
    steps = sorted(self._manager.all_steps())
    if not steps:
      raise MedsegError(f"{self.directory}: no checkpoint (train first, or check --workdir)")
    if which == LATEST:
      return steps[-1]
    if which not in steps:
      raise MedsegError(f"{self.directory}: no checkpoint at step {which} (have {steps})")
    return int(which)

  def restore(self, state: Any, sharding, which: str | int = LATEST) -> Restored:
    """`state` with its arrays read from the checkpoint that `which` names.

    'latest' is the newest readable checkpoint: one that cannot be read (truncated or
    missing files) is skipped with a warning and deleted (training writes that step
    again), and the one before it is tried.
    """
    if which == LATEST:
      return self._restore_newest(state, sharding)
    step = self.step(which)
    try:
      return self._read(step, state, sharding)
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
      raise MedsegError(f"{self.directory}/{step}: unreadable checkpoint "
                        f"({first_line(e)})") from e

  def _restore_newest(self, state: Any, sharding) -> Restored:
    steps = sorted(self._manager.all_steps(), reverse=True)
    self.step(LATEST)  # no checkpoint at all is an error of its own
    for index, step in enumerate(steps):
      try:
        restored = self._read(step, state, sharding)
      except Exception as e:  # pylint: disable=broad-except  (orbax raises many kinds)
        logging.warning("Skipping unreadable checkpoint %s/%d: %s", self.directory, step,
                        first_line(e))
        continue
      for unreadable in steps[:index]:
        self._manager.delete(unreadable)
      if index:  # the best may have been among them
        self._best_dice = self._saved_best_dice()
      return restored
    raise MedsegError(f"{self.directory}: none of the checkpoints {sorted(steps)} can be read; "
                      "pass --from_scratch to start over")

  def _read(self, step: int, state: Any, sharding) -> Restored:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                            _to_tree(state))
    tree = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract), META: ocp.args.JsonRestore()}))
    logging.info("Restored checkpoint %s/%d", self.directory, step)
    return Restored(step=step, state=state.replace(**tree[STATE]), meta=dict(tree[META]))

  def read_meta(self, which: str | int = LATEST) -> dict | None:
    """The `meta` item of a checkpoint (for 'latest' the newest readable one), or None."""
    steps = (sorted(self._manager.all_steps(), reverse=True) if which == LATEST
             else [self.step(which)])
    for step in steps:
      try:
        return dict(self._manager.restore(
            step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])
      except Exception:  # pylint: disable=broad-except  (the full restore reports it)
        continue
    return None

  def save_if_best(self, step: int, state: Any, meta: dict, dice: float) -> bool:
    """Saves `state` as `step` with its Dice if that beats every earlier validation."""
    if self._best_dice is not None and self._best_dice >= dice:
      return False
    self._save(step, state, meta, {_DICE: float(dice)})
    self._best_dice = float(dice)
    return True

  def save(self, step: int, state: Any, meta: dict) -> bool:
    """Saves `state` as `step` unless that step is saved; writing continues in the background."""
    if step in self._manager.all_steps():
      return False
    self._save(step, state, meta, None)
    return True

  def _save(self, step: int, state: Any, meta: dict, metrics: dict | None) -> None:
    self.wait()  # orbax would wait here too; after it the free space is what is left
    self._check_space(step, state)
    if step in self._manager.all_steps():
      # Saved without a Dice (the last step, validated after its save): orbax attaches
      # metrics to a step only as it writes it, so the same state is written again.
      self._manager.delete(step)
    with self._disk_full_reported():
      self._manager.save(step, args=_save_args(state, meta), metrics=metrics, force=True)

  def _check_space(self, step: int, state: Any) -> None:
    """Refuses a save that cannot fit. A write that fails midway ends with orbax's other
    writes still running against an event loop it has closed (tracebacks from
    tensorstore's threads) and a partial step; checked first, nothing is written."""
    need = _SAVE_MARGIN * sum(x.nbytes for x in jax.tree.leaves(_to_tree(state))) + _SAVE_SLACK
    existing = self.directory  # orbax's primary process creates it; others may not see it
    while not os.path.isdir(existing):
      existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if multihost.any_process(free < need):  # every process saves, or none
      raise MedsegError(f"{self.directory}: disk full: checkpoint {step} needs about "
                        f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free here; "
                        f"{self._newest()}")

  def _newest(self) -> str:
    latest = self._manager.latest_step()
    if latest is None:
      return "no checkpoint written yet (free space, then run the same command)"
    return (f"the newest complete checkpoint is step {latest} (free space, then run the same "
            "command to continue from it)")


  @contextlib.contextmanager
  def _disk_full_reported(self) -> Iterator[None]:
    """A write that found the disk full becomes one line (`files.disk_full_reported`);
    its unfinished step is removed."""
    try:
      with files.disk_full_reported(self.directory, self._newest):
        yield
    except MedsegError:  # only the disk-full line: orbax's own errors are not MedsegErrors
      if jax.process_index() == 0:
        remove_unfinished(self.directory)
      raise

  def wait(self) -> None:
    """Blocks until every checkpoint started so far is on disk."""
    with self._disk_full_reported():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def _dice(metrics: dict) -> float:
  return float(metrics[_DICE])


def _options(max_to_keep: int | None) -> ocp.CheckpointManagerOptions:
  """A training run's options (it passes `max_to_keep`), or a reader's: those create,
  write and clean up nothing, and skip orbax's root-metadata barrier."""
  best = {"best_fn": _dice, "best_mode": "max"}   # orbax writes `metrics` only with these
  if max_to_keep is None:
    return ocp.CheckpointManagerOptions(create=False, save_root_metadata=False, **best)
  keep = policies.AnyPreservationPolicy([
      policies.LatestN(n=max_to_keep),
      # Only steps saved with a Dice compete for the best; the others stay by LatestN.
      policies.BestN(get_metric_fn=_dice, n=1, keep_checkpoints_without_metrics=False)])
  return ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                      preservation_policy=keep, **best)


def _to_tree(state) -> dict:
  return {"step": state.step, "params": state.params, "model_state": state.model_state,
          "opt_state": state.opt_state}


def _save_args(state: Any, meta: dict) -> ocp.args.Composite:
  return ocp.args.Composite(**{STATE: ocp.args.StandardSave(_to_tree(state)),
                               META: ocp.args.JsonSave(meta)})
