"""What a training run builds from its settings before the first step, once."""

import dataclasses
import functools
from typing import Callable

import jax
import ml_collections
from absl import logging

from medseg_jax import kinds, models, optim
from medseg_jax.parallel import multihost, strategies
from medseg_jax.data import loader, pipeline, targets, volume_loader
from medseg_jax.evaluation import evaluate
from medseg_jax.training import losses, step
from medseg_jax.training.settings import RunSettings
from medseg_jax.training.state import TrainState, init_state


@dataclasses.dataclass(frozen=True)
class Setup:
  """Devices, data, model, optimizer and compiled steps of one run; never changed."""

  cfg: ml_collections.ConfigDict
  kind: kinds.DataKind
  workdir: str
  par: strategies.Parallel
  data: dict[str, loader.SliceSet | volume_loader.VolumeSet]
  data_info: dict               # as WORKDIR/data_info.json records it
  lr: optim.ResolvedSchedule
  global_batch: int
  steps_per_epoch: int
  num_steps: int
  epoch_draws: int              # examples drawn per epoch (data.augment.samples_per_epoch)
  init_state: TrainState        # fresh, on the host
  init_rng: jax.Array           # the step rng of a run that starts from scratch
  train_step: Callable
  evaluator: evaluate.Evaluator
  components: dict              # config key -> spec, source file and SHA-256 of each component
  split_seed: int               # the seed that drew the split (data.split_seed, or seed)


def build(run: RunSettings, workdir: str, par: strategies.Parallel) -> Setup:
  """Data, model, optimizer and compiled steps for the run of `run` on the devices of `par`."""
  cfg, kind, source = run.cfg, run.kind, run.source
  data, info = kind.load_splits(source, workdir, multihost.barrier)
  plan = epoch_plan(run, len(data["train"]), par.num_devices)
  logging.info("%d devices (%s), %d processes, global batch %d, %d steps per epoch "
               "(%d %s drawn per epoch), %d steps", par.num_devices,
               cfg.parallel.strategy, jax.process_count(), plan.global_batch,
               plan.steps_per_epoch, plan.epoch_draws, kind.unit, plan.num_steps)
  outputs = source.outputs(info["labels"])
  channels = data["train"].channels
  info = dict(info, num_classes=outputs.count, **outputs.record(), channels=channels,
              samples_per_epoch=plan.epoch_draws)
  logging.info("Data: %s", info)
  model = models.construct(run.network, cfg.model, outputs.count, cfg.data.image_size,
                           par.bn_axis_name)
  lr = optim.resolve_schedule(cfg, plan.global_batch, plan.steps_per_epoch, plan.num_steps)
  logging.info("LR policy %s:\n%s", cfg.lr.policy, lr.describe())
  tx = optim.make_optimizer(cfg, lr.schedule)
  init_rng, step_rng = jax.random.split(jax.random.key(cfg.seed))
  state = init_state(model, tx, init_rng, kind.input_shape(channels))
  train_fn = functools.partial(step.train_step, loss_fn=losses.for_outputs(run.loss, outputs),
                               augment=kind.augmentation())
  return Setup(cfg=cfg, kind=kind, workdir=workdir, par=par, data=data, data_info=info,
               lr=lr, global_batch=plan.global_batch, steps_per_epoch=plan.steps_per_epoch,
               num_steps=plan.num_steps, epoch_draws=plan.epoch_draws, init_state=state,
               init_rng=step_rng, train_step=par.in_flight.wrap(par.train_step(train_fn)),
               evaluator=make_evaluator(run, workdir, par, outputs,
                                        source.class_names(info["labels"])),
               components=run.components, split_seed=source.split_seed)


def epoch_plan(run: RunSettings, train_examples: int, num_devices: int
               ) -> pipeline.EpochPlan:
  """Global batch, steps per epoch and steps of the run of `run` on `num_devices`."""
  train = run.cfg.train
  return pipeline.epoch_plan(train_examples, run.kind.counted, run.source.samples_per_epoch,
                             train.per_device_batch_size, num_devices, train.num_epochs,
                             train.num_steps)


def build_state(run: RunSettings, par: strategies.Parallel, num_classes: int,
                channels: int, schedule: Callable, rng: jax.Array) -> TrainState:
  """A fresh host-side TrainState for the model and optimizer of the run of `run`."""
  cfg = run.cfg
  model = models.construct(run.network, cfg.model, num_classes, cfg.data.image_size,
                           par.bn_axis_name)
  return init_state(model, optim.make_optimizer(cfg, schedule), rng,
                    run.kind.input_shape(channels))


def make_evaluator(run: RunSettings, workdir: str, par: strategies.Parallel,
                   outputs: targets.Classes | targets.Regions, class_names: list[str]
                   ) -> evaluate.Evaluator:
  """The compiled eval step (3D: predict step over sliding windows) with what evaluation
  needs to batch and report."""
  return run.kind.evaluator(par, functools.partial(step.eval_step, outputs=outputs),
                            functools.partial(step.predict_step, outputs=outputs),
                            eval_batch(run.cfg, par.num_devices), outputs, class_names,
                            workdir)


def eval_batch(cfg: ml_collections.ConfigDict, num_devices: int) -> int:
  """The global batch of evaluation and prediction: `train.eval_batch_size` (or the
  training batch) per device."""
  return (cfg.train.eval_batch_size or cfg.train.per_device_batch_size) * num_devices


def step_of(par: strategies.Parallel, state: TrainState) -> int:
  """The step counter of a state placed on the mesh of `par`."""
  return int(multihost.to_host(par.replicated_state(state).step))
