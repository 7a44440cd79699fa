"""The training loop: build, restore, iterate, log, evaluate, checkpoint."""

import dataclasses
import itertools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from medseg_jax import (checkpoint, evaluation, files, losses, manifest, monitor, optim,
                        parallel)
from medseg_jax.data import augment, pipeline
from medseg_jax.errors import ConfigError
from medseg_jax.models import build_model
from medseg_jax.state import TrainState


@dataclasses.dataclass
class Run:
  """Everything built from a config before the first step."""

  cfg: ml_collections.ConfigDict
  workdir: str
  par: parallel.Parallel
  data: dict[str, pipeline.SliceSet]
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
  par = parallel.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
  if cfg.train.per_device_batch_size <= 0:
    raise ConfigError(f"train.per_device_batch_size={cfg.train.per_device_batch_size}: "
                      "must be positive")
  global_batch = cfg.train.per_device_batch_size * par.num_devices
  data, info = pipeline.load_splits(cfg, workdir)
  steps_per_epoch = len(data["train"]) // global_batch
  if steps_per_epoch == 0:
    raise ConfigError(f"train.per_device_batch_size={cfg.train.per_device_batch_size}: the "
                      f"global batch {global_batch} exceeds the {len(data['train'])} "
                      "training slices")
  num_steps = cfg.train.num_steps or cfg.train.num_epochs * steps_per_epoch
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


def build_state(cfg: ml_collections.ConfigDict, par: parallel.Parallel, num_classes: int,
                channels: int, schedule: Callable, rng: jax.Array) -> TrainState:
  """A fresh host-side TrainState for the model and optimizer of `cfg`."""
  model = build_model(cfg.model, num_classes, cfg.data.image_size, par.bn_axis_name)
  size = cfg.data.image_size
  return init_state(model, optim.make_optimizer(cfg, schedule), rng, (size, size, channels))


def init_state(model, tx, rng, sample_shape) -> TrainState:
  variables = jax.jit(model.init, static_argnames="train")(
      rng, jnp.zeros((1,) + tuple(sample_shape), jnp.float32), train=False)
  variables = dict(variables)
  params = variables.pop("params")
  return TrainState.create(apply_fn=model.apply, params=params, model_state=variables, tx=tx)


def restore_or_place(run: Run, step: int | None = None, best: bool = False) -> TrainState:
  """The checkpoint at `step` (newest, or best, if None) if there is one, else the fresh
  state; placed on the mesh."""
  state = run.state
  if run.checkpointer.latest_step() is not None:
    state = run.checkpointer.restore(state, run.par.replicated, step, best=best)
  return run.par.put_state(state)


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Trains, evaluates on validation periodically, then the best state on the test split."""
  started = time.time()
  run = build(cfg, workdir)
  state = restore_or_place(run)
  step = int(parallel.to_host(run.par.get_state(state).step))
  if step:
    logging.info("Resuming from checkpoint at step %d", step)
  if run.is_chief:
    files.write_json(os.path.join(workdir, "config.json"), cfg.to_dict())
    files.write_json(os.path.join(workdir, "data_info.json"),
                     dict(run.data_info, num_classes=run.num_classes,
                          channels=int(run.data["train"].image.shape[-1])))
    files.truncate_jsonl(os.path.join(workdir, "metrics.jsonl"), step)  # logged again below
    manifest.write(workdir, manifest.at_start(run))
  mon = monitor.Monitor(workdir, run.is_chief and cfg.monitor.enabled,
                        cfg.monitor.system_interval_seconds, run.num_steps, step,
                        run.steps_per_epoch)
  try:
    state = _train_loop(run, state, step, mon)
    run.checkpointer.save(run.num_steps, run.par.get_state(state))
    if run.checkpointer.best_step() is None:  # e.g. resumed after the end of an older run
      _validate(run, state, run.num_steps, mon)
    if run.checkpointer.best_step() is not None:
      state = restore_or_place(run, best=True)
    run.checkpointer.close()
    test_step = int(parallel.to_host(run.par.get_state(state).step))
    result = evaluation.evaluate(run, state, "test", test_step, surface=True, monitor=mon)
  finally:
    mon.close()
  if run.is_chief:
    manifest.write(workdir, manifest.at_end(workdir, time.time() - started, result))
  return result


def _validate(run: Run, state: TrainState, step: int, mon: monitor.Monitor) -> dict | None:
  """Validation metrics; the state is kept as the best checkpoint when its Dice is best."""
  result = evaluation.evaluate(run, state, "val", step, monitor=mon)
  if result is not None and result["dice"] is not None:
    run.checkpointer.save_if_best(step, run.par.get_state(state), result["dice"])
  return result


def _train_loop(run: Run, state: TrainState, step: int, mon: monitor.Monitor) -> TrainState:
  cfg = run.cfg
  log_every, eval_every = cfg.monitor.log_every_steps, cfg.train.eval_every_steps
  window = _Window(step)
  while step < run.num_steps:
    epoch, skip = divmod(step, run.steps_per_epoch)
    batches = itertools.islice(
        pipeline.train_batches(run.data["train"], run.global_batch, cfg.seed, epoch,
                               jax.process_index(), jax.process_count()),
        skip, None)  # resuming mid-epoch: the same order, minus the batches already seen
    while step < run.num_steps:
      fetch_start = time.perf_counter()
      batch = next(batches, None)
      if batch is None:
        break
      batch = run.par.put_batch(batch)
      window.data_wait += time.perf_counter() - fetch_start
      state, step_metrics = run.train_step(state, batch, run.step_rng)
      step += 1
      window.losses.append(step_metrics["loss"])
      record = {}
      if step % log_every == 0 or step == run.num_steps:
        record.update(_train_record(run, step, step_metrics, window, mon))
      if (eval_every and step % eval_every == 0) or step == run.num_steps:
        eval_start = time.perf_counter()
        result = _validate(run, state, step, mon)
        window.start += time.perf_counter() - eval_start  # throughput counts training only
        record.update({f"val_{k}": v for k, v in (result or {}).items()
                       if k not in ("per_class", "per_volume", "step")})
      if record and run.is_chief:
        files.append_jsonl(os.path.join(run.workdir, "metrics.jsonl"), dict(record, step=step))
      if run.checkpointer.due(step):
        run.checkpointer.save(step, run.par.get_state(state))
  return state


class _Window:
  """What happened since the last logged record."""

  def __init__(self, step: int):
    self.first_step, self.losses = step + 1, []
    self.start, self.data_wait = time.perf_counter(), 0.0


def _train_record(run: Run, step: int, step_metrics: dict, window: _Window,
                  mon: monitor.Monitor) -> dict:
  """Loss averaged since the last record, LR, throughput and timing; resets the window."""
  losses_ = [float(x) for x in parallel.to_host(window.losses)]
  elapsed = time.perf_counter() - window.start
  steps = len(losses_)
  slices_per_sec = steps * run.global_batch / elapsed
  lr = float(run.lr.schedule(step - 1))
  record = {"epoch": step / run.steps_per_epoch, "loss": float(np.mean(losses_)),
            "learning_rate": lr, "grad_norm": float(parallel.to_host(step_metrics["grad_norm"])),
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
  step = None if which in ("latest", "best") else int(which)
  state = restore_or_place(run, step, best=which == "best")
  run.checkpointer.close()
  step = int(parallel.to_host(run.par.get_state(state).step))
  return {split: evaluation.evaluate(run, state, split, step, surface=True)
          for split in ("val", "test")}
