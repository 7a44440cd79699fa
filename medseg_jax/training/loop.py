"""The training loop: build, resume, then one loop of steps and periodic actions, then test.

Read `train` top to bottom: every step is followed by the periodic actions (log,
validate, stop, checkpoint), each decided by a pure function of `decisions.py`. Nothing
built before the loop changes inside it except the train state and the loop's counters.
"""

import dataclasses
import os
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from medseg_jax import config_schema, files, optim
from medseg_jax.data import loader
from medseg_jax.data.loader import Position
from medseg_jax.parallel import multihost, strategies
from medseg_jax.evaluation import evaluate
from medseg_jax.monitor import events, manifest, profiler, run_state
from medseg_jax.training import checkpoint, decisions, plugins, preemption, warm_start
from medseg_jax.training.decisions import Stop
from medseg_jax.training.guard import DivergenceGuard
from medseg_jax.training.settings import RunSettings
from medseg_jax.training.setup import Setup, build
from medseg_jax.training.state import TrainState


@dataclasses.dataclass(frozen=True)
class Start:
  """Where training starts: a fresh state at step 0, or a checkpoint."""

  state: TrainState        # placed on the mesh
  step: int
  position: Position
  rng: jax.Array
  early_stopped: bool = False
  saved_step: int = 0      # the step as the checkpoint numbered it (another device count)


@dataclasses.dataclass(frozen=True)
class End:
  """Where training ended: the state and its step, the loader position, and why."""

  state: TrainState
  step: int
  position: Position
  stop: Stop
  stopped_by: str | None = None  # what asked for a stop (a signal's name, a plugin's reason)


def train_and_evaluate(settings: RunSettings, workdir: str,
                       par: strategies.Parallel, from_scratch: bool = False,
                       life: run_state.Lifetime | None = None) -> dict | None:
  """Trains on the devices of `par`, validating periodically, then tests the best state.

  Returns the test metrics, or None when a signal or the user's stop request stopped
  training (after a checkpoint). `life`, this process's record in the run, is told how
  training ended.
  """
  started = time.time()
  if from_scratch:
    checkpoint.remove_all(workdir)
  setup = build(settings, workdir, par)
  cfg = setup.cfg
  ckpt = checkpoint.Checkpointer(workdir, cfg.checkpoint.max_to_keep)
  start = resume(setup, ckpt)
  if jax.process_index() == 0:
    _write_run_files(setup, start)
  mon = events.Monitor(workdir, cfg.monitor.enabled,
                       cfg.monitor.system_interval_seconds, setup.num_steps, start.step,
                       setup.steps_per_epoch)
  try:
    plugs = plugins.Plugins(settings.plugins, cfg, workdir, mon.scalar)
    end = End(start.state, start.step, start.position, Stop.EARLY_STOPPING)
    if not start.early_stopped:
      end = train(setup, ckpt, mon, plugs, start)
    result = None if end.stop is Stop.SIGNAL else test(setup, ckpt, mon, end, start.rng)
    plugs.call("on_end", end.step, result)
  finally:
    ckpt.close()  # pending writes finish, also when training stopped on an error
    mon.close()
  if jax.process_index() == 0 and result is not None:
    manifest.write(workdir, manifest.at_end(workdir, time.time() - started, result))
  if life is not None:
    life.end(*_ending(end, result))
  return result


def _ending(end: End, result: dict | None) -> tuple[str, int, str]:
  """How training ended, for the run's records: (status, exit code, why)."""
  if end.stop is Stop.SIGNAL:
    return (run_state.STOPPED, 0, f"stopped by {end.stopped_by or 'a signal'} after step "
            f"{end.step}, with a checkpoint; the same command continues")
  how = {Stop.EARLY_STOPPING: "early stopping at step",
         Stop.PLUGIN: f"stopped by a plugin ({end.stopped_by}) at step"}.get(
             end.stop, "trained to step")
  dice = (f", test Dice {result['dice']:.4f}" if result and result.get("dice") is not None
          else "")
  return run_state.FINISHED, 0, f"{how} {end.step}{dice}"


def train(setup: Setup, ckpt: checkpoint.Checkpointer, mon: events.Monitor,
          plugs: plugins.Plugins, start: Start) -> End:
  """Steps from `start` to the last step, a stop signal or request, a plugin's request or
  early stopping; the state at the end is checkpointed. Returns it, its step, its loader
  position and why training stopped."""
  cfg, par = setup.cfg, setup.par
  guard = DivergenceGuard(cfg.train.divergence_factor, cfg.train.divergence_patience,
                          setup.lr.schedule)
  state, step, position, stop = start.state, start.step, start.position, Stop.NONE
  losses, window_start, data_wait = [], time.perf_counter(), 0.0   # since the last record
  profile = profiler.Profiler(setup.workdir, cfg.monitor.profile_steps)
  with preemption.StopRequest(jax.process_count() > 1, start.step,
                              run_state.stop_request_path(setup.workdir)) as signals, profile:
    fetch_start = time.perf_counter()
    for step, position, batch in _batches(setup, start.step, start.position):
      batch = par.put_batch(batch)
      data_wait += time.perf_counter() - fetch_start
      with profile.step(step):
        state, step_metrics = setup.train_step(state, batch, start.rng)
      guard.observe(step, step_metrics)
      losses.append(step_metrics["loss"])
      record, validation = {}, None
      if decisions.due(step, cfg.monitor.log_every_steps, setup.num_steps):
        guard.check()
        record = _train_record(setup, mon, step, step_metrics, losses,
                               time.perf_counter() - window_start, data_wait)
        losses, window_start, data_wait = [], time.perf_counter(), 0.0
      validated = decisions.due(step, cfg.train.eval_every_steps, setup.num_steps)
      if validated:
        eval_start = time.perf_counter()
        validation = _validate(setup, ckpt, mon, guard, state, step, position, start.rng)
        record.update(_val_record(validation))
        window_start += time.perf_counter() - eval_start  # throughput counts training only
      if record and jax.process_index() == 0:
        files.append_jsonl(os.path.join(setup.workdir, "metrics.jsonl"), dict(record, step=step))
      _ask(signals, plugs.call("on_log", step, record) if record else None,
           plugs.call("on_validation", step, validation) if validation else None)
      stop = decisions.stop_reason(signals.requested(step), step, ckpt.best_step(),
                                   cfg.train.early_stopping_patience,
                                   cfg.train.eval_every_steps, validated)
      if stop is not Stop.NONE:
        _log_stop(stop, step, ckpt, signals.reason)
        break
      if decisions.periodic(step, cfg.checkpoint.every_steps):
        _ask(signals, _save(setup, ckpt, guard, plugs, state, step, position, start.rng))
      fetch_start = time.perf_counter()
  _save(setup, ckpt, guard, plugs, state, step, position, start.rng,
        early_stopped=stop in (Stop.EARLY_STOPPING, Stop.PLUGIN))
  return End(state, step, position, stop, signals.reason if stop is not Stop.NONE else None)


def _ask(signals: preemption.StopRequest, *reasons: str | None) -> None:
  """Passes the plugins' stop requests on (the first reason counts)."""
  for reason in reasons:
    if reason:
      signals.ask(reason)


def _batches(setup: Setup, step: int,
             position: Position) -> Iterator[tuple[int, Position, dict]]:
  """(step, loader position after it, this process's part of its batch) for every step
  after `step` up to the last, across epochs of `setup.epoch_draws` slices."""
  data, batch, draws = setup.data["train"], setup.global_batch, setup.epoch_draws
  while step < setup.num_steps:
    position = loader.epoch_start(position, batch, draws)
    for local in setup.kind.train_batches(data, batch, setup.cfg.seed, position.epoch,
                                          jax.process_index(), jax.process_count(),
                                          position.offset, draws):
      step, position = step + 1, loader.after_step(position, batch, draws)
      yield step, position, local
      if step == setup.num_steps:
        return


def test(setup: Setup, ckpt: checkpoint.Checkpointer, mon: events.Monitor, end: End,
         rng: jax.Array) -> dict | None:
  """Test metrics of the checkpoint with the best validation Dice (of the state at `end`
  if none)."""
  state, step = end.state, end.step
  if ckpt.best_step() is None:  # e.g. resumed after the end of an older run
    _validate(setup, ckpt, mon, None, state, step, end.position, rng)
  if ckpt.best_step() is not None:
    best = ckpt.restore(setup.init_state, setup.par.replicated, checkpoint.BEST)
    state, step = setup.par.put_state(best.state), best.step
  return evaluate.evaluate(setup.evaluator, state, setup.data["test"], "test", step,
                           surface=True, monitor=mon)


def _validate(setup: Setup, ckpt: checkpoint.Checkpointer, mon: events.Monitor,
              guard: DivergenceGuard | None, state: TrainState, step: int,
              position: Position, rng: jax.Array) -> dict | None:
  """The validation metrics (None without any); the state is kept as the best checkpoint
  when its Dice is the best so far."""
  if guard is not None:
    guard.check()
  result = evaluate.evaluate(setup.evaluator, state, setup.data["val"], "val", step,
                             monitor=mon)
  if result is None or result["dice"] is None:
    return None
  ckpt.save_if_best(step, setup.par.replicated_state(state), _meta(setup, step, position, rng),
                    result["dice"])
  return result


def _val_record(result: dict | None) -> dict:
  """The `val_*` scalars of a validation, for metrics.jsonl, each class's Dice as
  `val_dice_class<index>` (and each region's as `val_dice_region<number from 1>`)."""
  record = {f"val_{k}": v for k, v in (result or {}).items()
            if k not in ("per_class", "per_region", "per_volume", "step")}
  record.update({f"val_dice_class{c['class']}": c["dice"]
                 for c in (result or {}).get("per_class") or [] if c.get("dice") is not None})
  record.update({f"val_dice_region{r['region'] + 1}": r["dice"]
                 for r in (result or {}).get("per_region") or [] if r.get("dice") is not None})
  return record


def _save(setup: Setup, ckpt: checkpoint.Checkpointer, guard: DivergenceGuard,
          plugs: plugins.Plugins, state: TrainState, step: int, position: Position,
          rng: jax.Array, early_stopped: bool = False) -> str | None:
  """A checkpoint of `state`, once the guard has passed every step up to it; then the
  plugins' `on_checkpoint`, whose stop request (if any) is returned."""
  guard.check()
  ckpt.save(step, setup.par.replicated_state(state),
            _meta(setup, step, position, rng, early_stopped))
  return plugs.call("on_checkpoint", step, os.path.join(ckpt.directory, str(step)))


def _meta(setup: Setup, step: int, position: Position, rng: jax.Array,
          early_stopped: bool = False) -> dict:
  """What a checkpoint keeps besides the arrays: enough to continue exactly."""
  return {"step": step, "epoch": position.epoch, "offset": position.offset,
          "global_batch": setup.global_batch, "num_devices": setup.par.num_devices,
          "process_count": jax.process_count(),
          "rng": np.asarray(jax.random.key_data(rng)).ravel().tolist(),
          "early_stopped": early_stopped, "config": setup.cfg.to_dict(),
          "components": setup.components}


def _log_stop(stop: Stop, step: int, ckpt: checkpoint.Checkpointer,
              signal_name: str | None) -> None:
  if stop is Stop.EARLY_STOPPING:
    logging.info("Early stopping at step %d: no better validation Dice since step %d",
                 step, ckpt.best_step())
  elif stop is Stop.PLUGIN:
    logging.info("Stopped at step %d by a plugin: %s", step, signal_name)
  else:
    logging.info("Stopped by %s after step %d with a checkpoint in %s; run the same command "
                 "to continue", signal_name or "a stop signal to another process", step,
                 ckpt.directory)


def resume(setup: Setup, ckpt: checkpoint.Checkpointer) -> Start:
  """The newest readable checkpoint placed on the mesh, or the fresh state at step 0
  (with the weights of `model.init_from`, if set).

  A checkpoint saved at another global batch (another device count) continues from the
  same loader position; the step is renumbered for the new batch, so the LR schedule,
  resolved for the new device count, continues at the same point of training.
  """
  if ckpt.latest_step() is None:  # only a run that starts from scratch takes model.init_from
    state = warm_start.apply(setup.cfg, setup.init_state, setup.data_info["num_classes"])
    return Start(setup.par.put_state(state), 0, Position(), setup.init_rng)
  config_schema.check_checkpoint(ckpt.read_meta(), setup.cfg, ckpt.directory, setup.components)
  restored = ckpt.restore(setup.init_state, setup.par.replicated)
  meta, state, step = restored.meta, restored.state, restored.step
  position = Position(meta["epoch"], meta["offset"])
  if meta["global_batch"] == setup.global_batch:
    logging.info("Resuming from checkpoint at step %d (epoch %d, %d %s into its order)",
                 step, position.epoch, position.offset, setup.kind.unit)
  else:
    step = loader.renumbered_step(position, setup.steps_per_epoch, setup.global_batch)
    state = state.replace(step=jnp.asarray(step, state.step.dtype),
                          opt_state=optim.with_step(state.opt_state, step))
    logging.info("Resuming from checkpoint at step %d saved on %d devices (global batch %d) "
                 "on %d devices (global batch %d): continuing at step %d of %d, epoch %d, "
                 "learning rate %.4g (lr.scaling=%s)", restored.step, meta["num_devices"],
                 meta["global_batch"], setup.par.num_devices, setup.global_batch, step,
                 setup.num_steps, position.epoch, float(setup.lr.schedule(step)),
                 setup.cfg.lr.scaling)
  return Start(setup.par.put_state(state), step, position,
               jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32)),
               bool(meta.get("early_stopped")), restored.step)


def _write_run_files(setup: Setup, start: Start) -> None:
  """The manifest, config.json, data_info.json; metrics logged after the checkpoint that
  training resumes from are dropped (they are logged again)."""
  workdir = setup.workdir
  parameters = int(sum(x.size for x in jax.tree.leaves(setup.init_state.params)))
  record = manifest.at_start(
      setup.cfg, setup.data_info, setup.evaluator.class_names, parameters, setup.lr,
      devices=setup.par.num_devices, global_batch=setup.global_batch,
      steps_per_epoch=setup.steps_per_epoch, num_steps=setup.num_steps,
      components=setup.components, data_record=setup.kind.record(setup.data_info),
      split_seed=setup.split_seed)
  manifest.write(workdir, record)
  files.write_json(os.path.join(workdir, "config.json"), setup.cfg.to_dict())
  files.write_json(os.path.join(workdir, "data_info.json"), setup.data_info)
  files.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), start.saved_step)


def _train_record(setup: Setup, mon: events.Monitor, step: int, step_metrics: dict,
                  losses: list, elapsed: float, data_wait: float) -> dict:
  """Loss averaged over the window since the last record, LR, throughput and timing."""
  losses = [float(x) for x in multihost.to_host(losses)]
  steps = len(losses)
  unit = setup.kind.unit  # slices, or patches in 3D
  per_sec = steps * setup.global_batch / elapsed
  lr = float(setup.lr.schedule(step - 1))
  record = {"epoch": step / setup.steps_per_epoch, "loss": float(np.mean(losses)),
            "learning_rate": lr, "grad_norm": float(multihost.to_host(step_metrics["grad_norm"])),
            f"{unit}_per_sec": per_sec,
            f"{unit}_per_sec_per_device": per_sec / setup.par.num_devices,
            "step_time": elapsed / steps, "data_wait_time": data_wait / steps,
            "compute_time": (elapsed - data_wait) / steps}
  system = mon.gather_system_samples()  # a collective: every process, at every record
  record.update(mon.train_window(step - steps + 1, losses, dict(record, step=step), system))
  record.update(system)
  if not mon.bar_active:
    logging.info("step %d/%d epoch %.2f loss %.4f lr %.3g %.1f %s/s", step,
                 setup.num_steps, record["epoch"], record["loss"], lr, per_sec, unit)
  return record

