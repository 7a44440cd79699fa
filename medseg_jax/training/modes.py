"""--mode=evaluate and --mode=predict: a run's checkpoint measured on its splits, or applied
to NIfTI files. Both restore the checkpoint that `--checkpoint` names (checked against the
config it was saved with) and hand it to `evaluation`."""

import functools
from typing import Any

import jax
import optax

from medseg_jax import config_schema
from medseg_jax.data import targets
from medseg_jax.evaluation import evaluate, postprocess, predict
from medseg_jax.parallel import strategies
from medseg_jax.training import checkpoint, setup, step
from medseg_jax.training.settings import RunSettings


def evaluate_checkpoint(settings: RunSettings, workdir: str,
                        par: strategies.Parallel, which: str = "latest") -> dict:
  """A checkpoint ('latest', 'best' or a step) on the validation and test splits."""
  checkpoint.require_checkpoint(workdir)
  built = setup.build(settings, workdir, par)
  state = restore_state(settings, workdir, which, par, built.init_state)
  at = setup.step_of(par, state)
  return {split: evaluate.evaluate(built.evaluator, state, built.data[split], split, at,
                                   surface=True)
          for split in ("val", "test")}


def predict_checkpoint(settings: RunSettings, workdir: str,
                       par: strategies.Parallel, input_path: str, output: str,
                       which: str = "latest", overwrite: bool = False,
                       probabilities: bool = False) -> list[tuple[str, str | None]]:
  """Label maps (and probabilities) of every NIfTI volume under `input_path`, from a
  checkpoint ('latest', 'best' or a step); every input is checked before any is read."""
  checkpoint.require_checkpoint(workdir)
  cfg, kind = settings.cfg, settings.kind
  info = predict.read_run_info(workdir)
  planned = predict.plan(input_path, output, info, overwrite, probabilities)
  # The optimizer is built only to give the checkpoint's tree its shape.
  template = setup.build_state(settings, par, info["num_classes"], info["channels"],
                               optax.constant_schedule(0.0), jax.random.key(0))
  state = restore_state(settings, workdir, which, par, template)
  batch = setup.eval_batch(cfg, par.num_devices)
  outputs = targets.from_info(info)
  run = predict.mesh_run(par, par.predict_step(functools.partial(step.predict_step,
                                                                 outputs=outputs)), state, batch)
  predict.predict(kind.probabilities(info, batch), planned, run,
                  postprocess.from_config(cfg.evaluation), outputs.labels)
  return [outputs for _, outputs in planned]


def restore_state(settings: RunSettings, workdir: str, which: str,
                  par: strategies.Parallel, template: Any) -> Any:
  """The checkpoint `which` ('latest', 'best' or a step) of the run in `workdir` (the
  caller has required one), read into the shape of `template` and placed on the mesh,
  after checking the run's config and components against that checkpoint's own.

  The check comes before the restore: a checkpoint of another model would otherwise fail
  as unreadable (and a 'latest' one be deleted as corrupt).
  """
  which = checkpoint.parse_which(which, "--checkpoint")
  cfg, records = settings.cfg, settings.components
  checkpointer = checkpoint.Checkpointer(workdir)
  try:
    meta = checkpointer.read_meta(which)
    config_schema.check_checkpoint(meta, cfg, checkpointer.directory, records)
    restored = checkpointer.restore(template, par.replicated, which)
    if meta is None or meta.get("step") != restored.step:  # 'latest' fell back to an older one
      config_schema.check_checkpoint(restored.meta, cfg, checkpointer.directory, records)
  finally:
    checkpointer.close()
  return par.put_state(restored.state)
