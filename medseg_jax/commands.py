"""What `medseg_jax.main` runs once its command line is read: the process group, then
training, evaluation, prediction or export.

`main` parses and checks the flags without importing JAX or the training stack, so a
mistyped flag or config key is answered in a fraction of a second; this module holds
everything that needs them.
"""

import contextlib
import dataclasses
import logging as std_logging
import os
from typing import Iterator

import jax
import ml_collections
from absl import logging

from medseg_jax import cli, components, config, config_schema
from medseg_jax.data import pipeline
from medseg_jax.errors import MedsegError, first_line
from medseg_jax.export import from_file, write
from medseg_jax.monitor import manifest, run_state
from medseg_jax.parallel import distributed, ending, multihost, strategies
from medseg_jax.training import checkpoint, guard, loop, modes, settings


@dataclasses.dataclass(frozen=True)
class Command:
  """The command line of `medseg_jax.main`, as read and checked there."""

  mode: str
  config: ml_collections.ConfigDict | None  # --config with its overrides; None if not given
  config_file: str | None                   # --config's PATH[:VARIANT]
  workdir: str | None
  input: str | None
  output: str | None
  checkpoint: str
  overwrite: bool
  model: str | None
  models_dir: str | None
  engine: str
  name: str | None
  probabilities: bool
  from_scratch: bool
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: list[str] | None

  @property
  def without_config(self) -> bool:
    """Export and predicting from a model file read a saved config, not a config file."""
    return self.mode == "export" or (self.mode == "predict" and self.model is not None)


def run(command: Command) -> None:
  """Runs `command`; a MedsegError leaves as it came (main prints its one line)."""
  checkpoint.parse_which(command.checkpoint, "--checkpoint")
  if not command.without_config:
    _run_config(command)
  elif command.mode == "export":
    _export(command)
  else:
    _predict_from_file(command)


def default_workdir(config_arg: str) -> str:
  """runs/<config file name>: `configs/unet_brats.py` (or `...py:VARIANT`) -> runs/unet_brats."""
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


def _start_processes(command: Command, cfg, workdir: str | None):
  """GPU memory settings, then the process group; only process 0 keeps INFO logs.

  Returns the context inside which the loss of another process ends this one with one
  line and exit code 75 (distributed.PeerWatch).
  """
  distributed.configure_memory(cfg.parallel.gpu_preallocate, cfg.parallel.gpu_memory_fraction)
  launch = distributed.detect(command.coordinator_address, command.num_processes,
                              command.process_id)
  local = [int(i) for i in command.local_device_ids] if command.local_device_ids else None
  watch = distributed.initialize(launch, local, cfg.parallel.distributed_timeout_seconds,
                                 checkpoint.directory(workdir) if workdir else None)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  return watch


def _check_before_data(command: Command, cfg, workdir: str) -> settings.RunSettings:
  """The whole config, and the dataset directory when the mode reads it, before anything
  reads the data or writes into the workdir; returns the run's settings, read once."""
  # model.init_from is read only by a training run that does not resume.
  starts_fresh = command.mode == "train" and (command.from_scratch
                                              or not checkpoint.has_checkpoint(workdir))
  config.check(cfg, starts_fresh)
  run_settings = settings.read(cfg)
  if command.mode != "predict":  # predict reads the run's data_info.json, not the dataset
    pipeline.check_dataset_root(run_settings.source, workdir)
  if not command.workdir:
    logging.info("Workdir: %s (the default for --config=%s)", workdir, command.config_file)
  return run_settings


def _export(command: Command) -> None:
  """--mode=export; the process group starts with the settings of --config, else of
  the defaults (the run's config is read from the checkpoint, after JAX has started).
  Several workdirs, comma-separated, export one ensemble file."""
  cfg = _command_line_config(command) if command.config is not None else None
  workdirs = command.workdir.split(",")
  with _start_processes(command, cfg or config_schema.base_config(), workdirs[0]):
    if cfg is not None:
      for workdir in workdirs:
        checkpoint.require_checkpoint(workdir)
        write.warn_if_config_differs(cfg, workdir, command.checkpoint)
    evaluation = cfg.evaluation if cfg is not None else None  # inference settings
    if len(workdirs) > 1:
      write.export_ensemble(workdirs, command.checkpoint, command.output, command.name,
                            command.overwrite, evaluation)
    else:
      write.export_run(command.workdir, command.checkpoint, command.output, command.name,
                       command.overwrite, evaluation)
    multihost.barrier("end of export")


def _predict_from_file(command: Command) -> None:
  """--mode=predict --model: the files are read and checked before JAX starts; several,
  comma-separated, or an ensemble file predict as an ensemble."""
  models = [model for spec in command.model.split(",")
            for model in from_file.load_all(spec, command.models_dir, command.engine)]
  with _start_processes(command, models[0].cfg, None):
    from_file.predict_files(models, command.input, command.output, command.engine,
                            command.overwrite, command.probabilities)
    multihost.barrier("end of prediction")


def _command_line_config(command: Command):
  """--config with its overrides, its components' file paths made absolute as a run's are."""
  cfg = command.config
  components.absolute_specs(cfg, os.path.dirname(os.path.abspath(
      command.config_file.partition(":")[0])))
  return cfg


def _run_config(command: Command) -> None:
  """Every mode that reads a config file: train, evaluate, predict from a run."""
  cfg = _command_line_config(command)
  workdir = command.workdir or default_workdir(command.config_file)
  with _start_processes(command, cfg, workdir):
    run_settings = _check_before_data(command, cfg, workdir)
    par = strategies.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
    if command.mode == "train":
      os.makedirs(workdir, exist_ok=True)
      _train(run_settings, workdir, par, command.from_scratch)
    elif command.mode == "evaluate":
      modes.evaluate_checkpoint(run_settings, workdir, par, command.checkpoint)
    else:
      modes.predict_checkpoint(run_settings, workdir, par, command.input, command.output,
                               command.checkpoint, command.overwrite, command.probabilities)
    # Process 0 writes the last files alone; the others wait here rather than in JAX's
    # shutdown, whose timeout is shorter than a slow disk.
    multihost.barrier("end of run")


def _train(run_settings: settings.RunSettings, workdir: str, par: strategies.Parallel,
           from_scratch: bool) -> None:
  """Training, with this process's record of its life and of how it ended
  (`monitor.run_state`), kept in the manifest too by process 0."""
  index = jax.process_index()

  def keep(end: dict) -> None:  # a run that failed before its manifest has none to add to
    if os.path.exists(os.path.join(workdir, "manifest.json")):
      manifest.write(workdir, {"end": end})
  life = run_state.Lifetime(workdir, index, jax.process_count(), keep if index == 0 else None)

  def lost(line: str, code: int) -> None:  # ended by distributed.PeerWatch
    life.end(run_state.LOST if code == distributed.PEER_LOST_EXIT_CODE else run_state.FAILED,
             code, line.strip().removeprefix("error: "))

  with life, ending.recorded_end(lost), _log_file(workdir, index == 0):
    try:
      loop.train_and_evaluate(run_settings, workdir, par, from_scratch, life)
    except BaseException as e:
      life.end(*_failure(e))
      raise


class _LogFile(std_logging.FileHandler):
  """A log file whose failed write (a full disk) drops the line: the run's own error
  handling reports the disk, not a logging traceback per line."""

  def handleError(self, record) -> None:
    del record


@contextlib.contextmanager
def _log_file(workdir: str, keep: bool) -> Iterator[None]:
  """Process 0's log lines also go to WORKDIR/train.log (the dashboard shows its end)."""
  if not keep:
    yield
    return
  handler = _LogFile(os.path.join(workdir, "train.log"))
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  cli.quiet_library_logs(handler)
  logging.get_absl_logger().addHandler(handler)
  try:
    yield
  finally:
    logging.get_absl_logger().removeHandler(handler)
    handler.close()


def _failure(error: BaseException) -> tuple[str, int, str]:
  """(status, exit code, why) of training that ended with `error`."""
  if isinstance(error, guard.Diverged):
    return run_state.DIVERGED, error.exit_code, first_line(error)
  if isinstance(error, MedsegError):
    return run_state.FAILED, error.exit_code, first_line(error)
  if isinstance(error, KeyboardInterrupt):
    return run_state.STOPPED, 130, "interrupted (a second signal stops at once)"
  if isinstance(error, SystemExit):
    return run_state.FAILED, error.code if isinstance(error.code, int) else 1, "exited"
  return run_state.FAILED, 1, f"{type(error).__name__}: {first_line(error)}"
