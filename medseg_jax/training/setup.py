"""What a training run builds from its config before the first step, once."""

import dataclasses
import functools
from typing import Callable

import jax
import ml_collections
from absl import logging

from medseg_jax import models, optim
from medseg_jax.parallel import multihost, strategies
from medseg_jax.data import loader, pipeline, preprocess, volume_loader
from medseg_jax.evaluation import evaluate, predict, sliding_window
from medseg_jax.training import losses, plugins, step
from medseg_jax.training.state import TrainState, init_state


@dataclasses.dataclass(frozen=True)
class Setup:
  """Devices, data, model, optimizer and compiled steps of one run; never changed."""

  cfg: ml_collections.ConfigDict
  workdir: str
  par: strategies.Parallel
  data: dict[str, loader.SliceSet | volume_loader.VolumeSet]
  data_info: dict               # as WORKDIR/data_info.json records it
  lr: optim.ResolvedSchedule
  global_batch: int
  steps_per_epoch: int
  num_steps: int
  epoch_draws: int              # slices drawn per epoch (data.augment.samples_per_epoch)
  init_state: TrainState        # fresh, on the host
  init_rng: jax.Array           # the step rng of a run that starts from scratch
  train_step: Callable
  evaluator: evaluate.Evaluator
  components: dict              # config key -> spec, source file and SHA-256 of each component


def build(cfg: ml_collections.ConfigDict, workdir: str, par: strategies.Parallel) -> Setup:
  """Data, model, optimizer and compiled steps for `cfg` on the devices of `par`."""
  data, info = pipeline.load_splits(cfg, workdir, multihost.barrier)
  plan = pipeline.epoch_plan(cfg, len(data["train"]), par.num_devices)
  global_batch, steps_per_epoch, num_steps = (plan.global_batch, plan.steps_per_epoch,
                                              plan.num_steps)
  num_classes = pipeline.num_classes(cfg, info)
  channels = data["train"].channels
  info = dict(info, num_classes=num_classes, channels=channels,
              samples_per_epoch=plan.epoch_draws)
  init_rng, step_rng = jax.random.split(jax.random.key(cfg.seed))
  lr = optim.resolve_schedule(cfg, global_batch, steps_per_epoch, num_steps)
  state = build_state(cfg, par, num_classes, channels, lr.schedule, init_rng)
  logging.info("%d devices (%s), %d processes, global batch %d, %d steps per epoch "
               "(%d %s drawn per epoch), %d steps", par.num_devices,
               cfg.parallel.strategy, jax.process_count(), global_batch, steps_per_epoch,
               plan.epoch_draws, pipeline.example_unit(cfg.data), num_steps)
  logging.info("LR policy %s:\n%s", cfg.lr.policy, lr.describe())
  logging.info("Data: %s", info)
  return Setup(cfg=cfg, workdir=workdir, par=par, data=data, data_info=info, lr=lr,
               global_batch=global_batch, steps_per_epoch=steps_per_epoch,
               num_steps=num_steps, epoch_draws=plan.epoch_draws, init_state=state,
               init_rng=step_rng,
               train_step=par.train_step(functools.partial(
                   step.train_step, loss_fn=losses.get_loss(cfg.train.loss),
                   augment=pipeline.augmentation(cfg.data))),
               evaluator=make_evaluator(cfg, workdir, par, num_classes,
                                        pipeline.class_names(cfg, info)),
               components=component_records(cfg))


def build_state(cfg: ml_collections.ConfigDict, par: strategies.Parallel, num_classes: int,
                channels: int, schedule: Callable, rng: jax.Array) -> TrainState:
  """A fresh host-side TrainState for the model and optimizer of `cfg`."""
  model = models.build_model(cfg.model, num_classes, cfg.data.image_size, par.bn_axis_name)
  return init_state(model, optim.make_optimizer(cfg, schedule), rng,
                    input_shape(cfg, channels))


def input_shape(cfg: ml_collections.ConfigDict, channels: int) -> tuple[int, ...]:
  """One example's shape: (image_size, image_size, channels), or with data.spatial_dims=3
  a patch (D, H, W, channels) of data.patch_size."""
  if cfg.data.spatial_dims == 3:
    return tuple(int(n) for n in cfg.data.patch_size) + (channels,)
  return (cfg.data.image_size, cfg.data.image_size, channels)


def make_evaluator(cfg: ml_collections.ConfigDict, workdir: str, par: strategies.Parallel,
                   num_classes: int, class_names: list[str]) -> evaluate.Evaluator:
  """The compiled eval step (3D: predict step over sliding windows) with what evaluation
  needs to batch and report."""
  volumes = cfg.data.spatial_dims == 3
  batch = eval_batch(cfg, par.num_devices)
  predict_fn = par.predict_step(step.predict_step) if volumes else None
  return evaluate.Evaluator(eval_step=par.eval_step(functools.partial(
                                step.eval_step, num_classes=num_classes)),
                            put_batch=par.put_batch, global_batch=batch,
                            num_classes=num_classes, class_names=class_names,
                            workdir=workdir,
                            windows=windows(cfg, par.num_devices) if volumes else None,
                            window_run=(lambda state: predict.mesh_run(
                                par, predict_fn, state, batch)) if volumes else None)


def windows(cfg: ml_collections.ConfigDict, num_devices: int) -> sliding_window.Windows:
  """The sliding-window settings of `cfg` (3D), a global eval batch of windows at a time."""
  ev = cfg.evaluation
  return sliding_window.Windows(patch=tuple(int(n) for n in cfg.data.patch_size),
                                overlap=float(ev.window_overlap),
                                gaussian_sigma=float(ev.gaussian_sigma),
                                mirror=bool(ev.mirror), batch=eval_batch(cfg, num_devices))


def prediction_settings(cfg: ml_collections.ConfigDict, info: dict, num_devices: int
                        ) -> preprocess.Settings | predict.Volumetric:
  """How `evaluation.predict` prepares and predicts a new volume for the run of `cfg`,
  whose data_info.json (or model.json) is `info`."""
  if cfg.data.spatial_dims == 3:
    return predict.volumetric(info, cfg.data.modalities, windows(cfg, num_devices))
  return preprocess.settings_from_config(cfg.data)


def eval_batch(cfg: ml_collections.ConfigDict, num_devices: int) -> int:
  """The global batch of evaluation and prediction: `train.eval_batch_size` (or the
  training batch) per device."""
  return (cfg.train.eval_batch_size or cfg.train.per_device_batch_size) * num_devices


def step_of(par: strategies.Parallel, state: TrainState) -> int:
  """The step counter of a state placed on the mesh of `par`."""
  return int(multihost.to_host(par.replicated_state(state).step))


def component_records(cfg: ml_collections.ConfigDict) -> dict:
  """The spec, source file and SHA-256 of every component `cfg` names, by config key."""
  found = [models.network(cfg.model), losses.loss_component(cfg.train.loss),
           strategies.strategy_component(cfg.parallel.strategy)]
  records = {c.key: c.record() for c in found}
  for index, plugin in enumerate(plugins.plugin_components(cfg)):
    records[f"train.plugins[{index}]"] = plugin.record()
  return records
