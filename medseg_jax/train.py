"""The training loop: build, restore, iterate, log, evaluate, checkpoint."""

import dataclasses
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import (checkpoint, config, evaluation, files, losses, manifest, monitor,
                        optim, preemption)
from medseg_jax.data import augment, loader, pipeline
from medseg_jax.errors import ConfigError
from medseg_jax.guard import DivergenceGuard
from medseg_jax.models import build_model
from medseg_jax.parallel import multihost, strategies
from medseg_jax.state import TrainState


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step."""

  cfg: ml_collections.ConfigDict
  workdir: str
  par: strategies.Parallel
  data: dict[str, loader.SliceSet]
  data_info: dict
  num_classes: int
  state: TrainState                 # placed on the mesh
  train_step: Callable
  eval_step: Callable
  lr: optim.ResolvedSchedule
  global_batch: int
  steps_per_epoch: int
  num_steps: int
  checkpointer: checkpoint.Checkpointer
  step_rng: jax.Array

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0

  @property
  def class_names(self) -> list[str]:
    return pipeline.class_names(self.cfg, self.data_info)


def build(cfg: ml_collections.ConfigDict, workdir: str) -> Run:
  """Devices, data, model, optimizer and compiled steps for `cfg`."""
  par = strategies.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
  data, info = pipeline.load_splits(cfg, workdir)
  plan = pipeline.epoch_plan(cfg, len(data["train"]), par.num_devices)
  global_batch, steps_per_epoch, num_steps = (plan.global_batch, plan.steps_per_epoch,
                                              plan.num_steps)
  num_classes = pipeline.num_classes(cfg, info)
  init_rng, step_rng = jax.random.split(jax.random.key(cfg.seed))
  lr = optim.resolve_schedule(cfg, global_batch, steps_per_epoch, num_steps)
  state = build_state(cfg, par, num_classes, data["train"].image.shape[-1], lr.schedule,
                      init_rng)
  logging.info("%d devices (%s), %d processes, global batch %d, %d steps per epoch, %d steps",
               par.num_devices, cfg.parallel.strategy, jax.process_count(), global_batch,
               steps_per_epoch, num_steps)
  logging.info("LR policy %s:\n%s", cfg.lr.policy, lr.describe())
  logging.info("Data: %s", info)
  return Run(cfg=cfg, workdir=workdir, par=par, data=data, data_info=info,
             num_classes=num_classes, state=state,
             train_step=par.train_step(losses.get_loss(cfg.train.loss),
                                       augment.from_config(cfg.data.augment)),
             eval_step=par.eval_step(num_classes), lr=lr,
             global_batch=global_batch, steps_per_epoch=steps_per_epoch, num_steps=num_steps,
             checkpointer=checkpoint.Checkpointer(workdir, cfg.checkpoint.every_steps,
                                                  cfg.checkpoint.max_to_keep),
             step_rng=step_rng)


def build_state(cfg: ml_collections.ConfigDict, par: strategies.Parallel, num_classes: int,
                channels: int, schedule: Callable, rng: jax.Array) -> TrainState:
  """A fresh host-side TrainState for the model and optimizer of `cfg`."""
  model = build_model(cfg.model, num_classes, cfg.data.image_size, par.bn_axis_name)
  size = cfg.data.image_size
  return init_state(model, optim.make_optimizer(cfg, schedule), rng, (size, size, channels))


def init_state(model, tx, rng, sample_shape) -> TrainState:
  # Initialisation runs once on one device, where the partitionable threefry only adds
  # compile time (seconds per model on a CPU); the classic one is as deterministic.
  with jax.threefry_partitionable(False):
    variables = jax.jit(model.init, static_argnames="train")(
        rng, jnp.zeros((1,) + tuple(sample_shape), jnp.float32), train=False)
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState.create(apply_fn=model.apply, params=params, model_state=variables, tx=tx)


@dataclasses.dataclass
class Position:
  """Where the loader stands: `offset` slices into the order of epoch `epoch`."""

  epoch: int = 0
  offset: int = 0


@dataclasses.dataclass
class _Progress:
  """The loop's state between steps."""

  state: TrainState
  step: int
  position: Position
  stopped: str | None = None   # why training stopped before its last step


def restore_or_place(run: Run, step: int | None = None, best: bool = False) -> TrainState:
  """The checkpoint at `step` (newest readable, or best, if None), placed on the mesh."""
  restored = run.checkpointer.restore(run.state, run.par.replicated, step, best=best)
  return run.par.put_state(restored.state)


def restore_state(cfg: ml_collections.ConfigDict, par: strategies.Parallel,
                  checkpointer: checkpoint.Checkpointer, template: TrainState,
                  which: str = "latest") -> TrainState:
  """--mode=evaluate|predict: the checkpoint `which` ('latest', 'best' or a step) placed
  on the mesh, after checking `cfg` against that checkpoint's own config.

  The check comes before the restore: a checkpoint of another model would otherwise fail
  as unreadable (and a 'latest' one be deleted as corrupt).
  """
  best = which == "best"
  step = None if which in ("latest", "best") else int(which)
  where = checkpointer.directory + ("_best" if best else "")
  meta = checkpointer.read_meta(step, best=best)
  checkpoint.check_config(meta, cfg, where)
  restored = checkpointer.restore(template, par.replicated, step, best=best)
  if meta is None or meta.get("step") != restored.step:  # 'latest' fell back to an older one
    checkpoint.check_config(restored.meta, cfg, where)
  return par.put_state(restored.state)


def resume(run: Run) -> tuple[_Progress, int]:
  """The loop's starting point from the newest readable checkpoint (the fresh state at
  step 0 if there is none), and the step as the checkpoint numbered it.

  A checkpoint saved at another global batch (another device count) continues from the
  same loader position; the step is renumbered for the new batch, so the LR schedule,
  resolved for the new device count, continues at the same point of training.
  """
  if run.checkpointer.latest_step() is None:
    return _Progress(run.par.put_state(run.state), 0, Position()), 0
  checkpoint.check_config(run.checkpointer.read_meta(), run.cfg, run.checkpointer.directory)
  restored = run.checkpointer.restore(run.state, run.par.replicated)
  meta, state, step = restored.meta, restored.state, restored.step
  position = Position(meta["epoch"], meta["offset"])
  run.step_rng = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
  if meta["global_batch"] == run.global_batch:
    logging.info("Resuming from checkpoint at step %d (epoch %d, slice %d of its order)",
                 step, position.epoch, position.offset)
  else:
    state, step = _renumber(run, restored, position)
  stopped = "early stopping" if meta.get("early_stopped") else None
  return _Progress(run.par.put_state(state), step, position, stopped), restored.step


def _renumber(run: Run, restored: checkpoint.Restored,
              position: Position) -> tuple[TrainState, int]:
  """The restored state continued at this run's global batch: the step that reaches the
  same loader position, with every optimizer step counter set to it."""
  meta = restored.meta
  step = position.epoch * run.steps_per_epoch + position.offset // run.global_batch
  state = restored.state.replace(step=jnp.asarray(step, restored.state.step.dtype),
                                 opt_state=optim.with_step(restored.state.opt_state, step))
  logging.info("Resuming from checkpoint at step %d saved on %d devices (global batch %d) "
               "on %d devices (global batch %d): continuing at step %d of %d, epoch %d, "
               "learning rate %.4g (lr.scaling=%s)", restored.step, meta["num_devices"],
               meta["global_batch"], run.par.num_devices, run.global_batch, step,
               run.num_steps, position.epoch, float(run.lr.schedule(step)), run.cfg.lr.scaling)
  return state, step


def _meta(run: Run, step: int, position: Position, early_stopped: bool = False) -> dict:
  """What a checkpoint keeps besides the arrays: enough to continue exactly."""
  return {"step": step, "epoch": position.epoch, "offset": position.offset,
          "global_batch": run.global_batch, "num_devices": run.par.num_devices,
          "process_count": jax.process_count(),
          "rng": np.asarray(jax.random.key_data(run.step_rng)).ravel().tolist(),
          "early_stopped": early_stopped, "config": run.cfg.to_dict()}


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str,
                       from_scratch: bool = False) -> dict | None:
  """Trains, evaluates on validation periodically, then the best state on the test split.

  Returns the test metrics, or None when a signal stopped training (after a checkpoint).
  """
  started = time.time()
  if from_scratch:
    checkpoint.remove_all(workdir)
  run = build(cfg, workdir)
  progress, saved_step = resume(run)
  if run.is_chief:
    files.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    files.write_json(os.path.join(workdir, "data_info.json"),
                     dict(run.data_info, num_classes=run.num_classes,
                          channels=int(run.data["train"].image.shape[-1])))
    # Steps after the checkpoint are logged again below.
    files.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), saved_step)
    manifest.write(workdir, manifest.at_start(run))
  mon = monitor.Monitor(workdir, cfg.monitor.enabled,
                        cfg.monitor.system_interval_seconds, run.num_steps, progress.step,
                        run.steps_per_epoch)
  try:
    result = _train_then_test(run, progress, mon)
  finally:
    run.checkpointer.close()  # pending writes finish, also when training stopped on an error
    mon.close()
  if run.is_chief and result is not None:
    manifest.write(workdir, manifest.at_end(workdir, time.time() - started, result))
  return result


def _train_then_test(run: Run, progress: _Progress, mon: monitor.Monitor) -> dict | None:
  guard = DivergenceGuard(run.cfg.train.divergence_factor, run.cfg.train.divergence_patience,
                          run.lr.schedule)
  if progress.stopped is None:
    with preemption.StopRequest(jax.process_count() > 1) as stop:
      _train_loop(run, progress, mon, guard, stop)
  _save(run, guard, progress, early_stopped=progress.stopped == "early stopping")
  if progress.stopped not in (None, "early stopping"):
    run.checkpointer.wait()
    logging.info("Stopped by %s after step %d with a checkpoint in %s; run the same command "
                 "to continue", progress.stopped, progress.step, run.checkpointer.directory)
    return None
  if run.checkpointer.best_step() is None:  # e.g. resumed after the end of an older run
    _validate(run, progress, mon, guard)
  state = progress.state
  if run.checkpointer.best_step() is not None:
    state = restore_or_place(run, best=True)
  test_step = int(multihost.to_host(run.par.host_state(state).step))
  return evaluation.evaluate(run, state, "test", test_step, surface=True, monitor=mon)


def _save(run: Run, guard: DivergenceGuard, progress: _Progress, **meta) -> None:
  """A checkpoint of the current state, once the guard has passed every step up to it."""
  guard.check()
  run.checkpointer.save(progress.step, run.par.host_state(progress.state),
                        _meta(run, progress.step, progress.position, **meta))


def _validate(run: Run, progress: _Progress, mon: monitor.Monitor,
              guard: DivergenceGuard) -> dict | None:
  """Validation metrics; the state is kept as the best checkpoint when its Dice is best."""
  guard.check()
  result = evaluation.evaluate(run, progress.state, "val", progress.step, monitor=mon)
  if result is not None and result["dice"] is not None:
    run.checkpointer.save_if_best(progress.step, run.par.host_state(progress.state),
                                  _meta(run, progress.step, progress.position), result["dice"])
  return result


def _train_loop(run: Run, progress: _Progress, mon: monitor.Monitor, guard: DivergenceGuard,
                stop: preemption.StopRequest) -> None:
  """Steps until the last step, a stop signal or early stopping; updates `progress`."""
  window = _Window(progress.step)
  while progress.step < run.num_steps:
    position = progress.position
    batches = loader.train_batches(run.data["train"], run.global_batch, run.cfg.seed,
                                     position.epoch, jax.process_index(), jax.process_count(),
                                     position.offset)
    while progress.step < run.num_steps:
      fetch_start = time.perf_counter()
      batch = next(batches, None)
      if batch is None:  # the epoch is over
        progress.position = Position(position.epoch + 1, 0)
        break
      batch = run.par.put_batch(batch)
      window.data_wait += time.perf_counter() - fetch_start
      progress.state, step_metrics = run.train_step(progress.state, batch, run.step_rng)
      progress.step += 1
      position.offset += run.global_batch
      guard.observe(progress.step, step_metrics)
      window.losses.append(step_metrics["loss"])
      _after_step(run, progress, step_metrics, window, mon, guard, stop)
      if progress.stopped:
        return


def _after_step(run: Run, progress: _Progress, step_metrics: dict, window: "_Window",
                mon: monitor.Monitor, guard: DivergenceGuard,
                stop: preemption.StopRequest) -> None:
  """Logging, validation, early stopping, stop requests and periodic checkpoints."""
  cfg, step = run.cfg, progress.step
  eval_every = cfg.train.eval_every_steps
  record = {}
  if step % cfg.monitor.log_every_steps == 0 or step == run.num_steps:
    guard.check()
    record.update(_train_record(run, step, step_metrics, window, mon))
  if (eval_every and step % eval_every == 0) or step == run.num_steps:
    eval_start = time.perf_counter()
    result = _validate(run, progress, mon, guard)
    window.start += time.perf_counter() - eval_start  # throughput counts training only
    record.update({f"val_{k}": v for k, v in (result or {}).items()
                   if k not in ("per_class", "per_volume", "step")})
    if _plateaued(run, step):
      logging.info("Early stopping at step %d: no better validation Dice since step %d",
                   step, run.checkpointer.best_step())
      progress.stopped = "early stopping"
  if record and run.is_chief:
    files.append_jsonl(os.path.join(run.workdir, "metrics.jsonl"), dict(record, step=step))
  if stop.requested(step):
    progress.stopped = stop.signal_name or "a stop signal to another process"
  if run.checkpointer.due(step) and not progress.stopped:
    _save(run, guard, progress)


def _plateaued(run: Run, step: int) -> bool:
  """Early stopping: `train.early_stopping_patience` validations without a better Dice."""
  patience, best = run.cfg.train.early_stopping_patience, run.checkpointer.best_step()
  return bool(patience and best is not None
              and step - best >= patience * run.cfg.train.eval_every_steps)


class _Window:
  """What happened since the last logged record."""

  def __init__(self, step: int):
    self.first_step, self.losses = step + 1, []
    self.start, self.data_wait = time.perf_counter(), 0.0


def _train_record(run: Run, step: int, step_metrics: dict, window: _Window,
                  mon: monitor.Monitor) -> dict:
  """Loss averaged since the last record, LR, throughput and timing; resets the window."""
  losses_ = [float(x) for x in multihost.to_host(window.losses)]
  elapsed = time.perf_counter() - window.start
  steps = len(losses_)
  slices_per_sec = steps * run.global_batch / elapsed
  lr = float(run.lr.schedule(step - 1))
  record = {"epoch": step / run.steps_per_epoch, "loss": float(np.mean(losses_)),
            "learning_rate": lr, "grad_norm": float(multihost.to_host(step_metrics["grad_norm"])),
            "slices_per_sec": slices_per_sec,
            "slices_per_sec_per_device": slices_per_sec / run.par.num_devices,
            "step_time": elapsed / steps, "data_wait_time": window.data_wait / steps,
            "compute_time": (elapsed - window.data_wait) / steps}
  record.update(mon.train_window(window.first_step, losses_, dict(record, step=step)))
  if not mon.bar_active:
    logging.info("step %d/%d epoch %.2f loss %.4f lr %.3g %.1f slices/s", step, run.num_steps,
                 record["epoch"], record["loss"], lr, slices_per_sec)
  window.__init__(step)
  return record


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str,
                        which: str = "latest") -> dict:
  """--mode=evaluate: a checkpoint ('latest', 'best' or a step) on validation and test."""
  checkpoint.require_checkpoint(workdir)
  run = build(cfg, workdir)
  state = restore_state(cfg, run.par, run.checkpointer, run.state, which)
  run.checkpointer.close()
  step = int(multihost.to_host(run.par.host_state(state).step))
  return {split: evaluation.evaluate(run, state, split, step, surface=True)
          for split in ("val", "test")}
