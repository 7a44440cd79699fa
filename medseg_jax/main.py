"""Entry point: medseg-jax (or python -m medseg_jax.main) --config=configs/NAME.py [--workdir=DIR] [--mode=...];
--mode=export --workdir=DIR and --mode=predict --model=FILE need no --config (export takes
one, and says where it differs from the checkpoint's)."""

import contextlib
import logging as std_logging
import os
import sys
from typing import Iterator

import jax
from absl import app, flags, logging

from medseg_jax import cli, components, config, config_schema
from medseg_jax.data import pipeline
from medseg_jax.errors import ConfigError, MedsegError, first_line
from medseg_jax.export import from_file, write
from medseg_jax.monitor import manifest, run_state
from medseg_jax.parallel import distributed, ending, multihost, strategies
from medseg_jax.training import checkpoint, guard, loop, modes, settings

MODES = ("train", "evaluate", "predict", "export")

_CONFIG = cli.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs; "
                                "default runs/<config file name>.")
_MODE = flags.DEFINE_enum("mode", "train", MODES,
                          "train (then test), evaluate a checkpoint, predict NIfTI files, or "
                          "export a checkpoint as one model file.")
_INPUT = flags.DEFINE_string("input", None, "predict: a NIfTI file or a directory of them.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output file (*.nii.gz) or directory; "
                              "export: the model file.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest", "evaluate/predict/export: 'latest', "
                                  "'best' (validation Dice) or a step.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "predict/export: replace existing outputs.")
_MODEL = flags.DEFINE_string("model", None, "predict: from a model file, or a model NAME in "
                             "the zoo, instead of a run (no --config, no --workdir).")
_MODELS_DIR = flags.DEFINE_string("models_dir", None, "The zoo's directory for --model=NAME; "
                                  "default $MEDSEG_MODELS, else ~/.cache/medseg_jax/models.")
_ENGINE = flags.DEFINE_enum("engine", "jax", from_file.ENGINES,
                            "predict --model: jax (every device, GPUs included; the same bytes "
                            "as the run's checkpoint) or onnxruntime (CPU, one process).")
_NAME = flags.DEFINE_string("name", None, "export: the model's name (default: the workdir's).")
_PROBABILITIES = flags.DEFINE_bool("probabilities", False,
                                   "predict: also write per-class probability maps.")
_FROM_SCRATCH = flags.DEFINE_bool("from_scratch", False,
                                  "train: delete the workdir's checkpoints and start over.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")
_LOCAL_DEVICES = flags.DEFINE_list("local_device_ids", None,
                                   "Multi-process: the local devices this process uses.")


def _without_config() -> bool:
  """Export and predicting from a model file read a saved config, not a config file."""
  return _MODE.value == "export" or (_MODE.value == "predict" and _MODEL.value is not None)


def _check_flags() -> None:
  if _MODE.value == "predict" and not (_INPUT.value and _OUTPUT.value):
    cli.fail("--mode=predict needs --input and --output", 2)
  if _MODE.value == "export" and not (_WORKDIR.value and _OUTPUT.value):
    cli.fail("--mode=export needs --workdir and --output", 2)
  if _MODE.value == "predict" and _MODEL.value is not None and flags.FLAGS["config"].present:
    cli.fail("--config: --mode=predict uses the model file's own config; drop --config", 2)
  if _MODEL.value is not None and (_MODE.value != "predict" or _WORKDIR.value):
    cli.fail("--model: only with --mode=predict, and without --workdir", 2)
  if _ENGINE.value != "jax" and _MODEL.value is None:
    cli.fail(f"--engine={_ENGINE.value}: only with --model", 2)
  try:
    checkpoint.parse_which(_CHECKPOINT.value, "--checkpoint")
  except ConfigError as e:
    cli.fail(str(e), e.exit_code)
  if _LOCAL_DEVICES.value and not all(i.isdigit() for i in _LOCAL_DEVICES.value):
    cli.fail(f"--local_device_ids={','.join(_LOCAL_DEVICES.value)}: device numbers, "
             "comma-separated", 2)


def _start_processes(cfg, workdir: str | None):
  """GPU memory settings, then the process group; only process 0 keeps INFO logs.

  Returns the context inside which the loss of another process ends this one with one
  line and exit code 75 (distributed.PeerWatch).
  """
  distributed.configure_memory(cfg.parallel.gpu_preallocate, cfg.parallel.gpu_memory_fraction)
  launch = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  local = [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None
  watch = distributed.initialize(launch, local, cfg.parallel.distributed_timeout_seconds,
                                 checkpoint.directory(workdir) if workdir else None)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  return watch


def default_workdir(config_arg: str) -> str:
  """runs/<config file name>: `configs/unet_brats.py` (or `...py:VARIANT`) -> runs/unet_brats."""
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


def _check_before_data(cfg, workdir: str) -> settings.RunSettings:
  """The whole config, and the dataset directory when the mode reads it, before anything
  reads the data or writes into the workdir; returns the run's settings, read once."""
  # model.init_from is read only by a training run that does not resume.
  starts_fresh = _MODE.value == "train" and (_FROM_SCRATCH.value
                                             or not checkpoint.has_checkpoint(workdir))
  config.check(cfg, starts_fresh)
  run = settings.read(cfg)
  if _MODE.value != "predict":  # predict reads the run's data_info.json, not the dataset
    pipeline.check_dataset_root(run.source, workdir)
  if not _WORKDIR.value:
    logging.info("Workdir: %s (the default for --config=%s)", workdir,
                 flags.FLAGS["config"].config_filename)
  return run


def _export() -> None:
  """--mode=export; the process group starts with the settings of --config, else of
  the defaults (the run's config is read from the checkpoint, after JAX has started)."""
  cfg = _command_line_config() if flags.FLAGS["config"].present else None
  with _start_processes(cfg or config_schema.base_config(), _WORKDIR.value):
    if cfg is not None:
      checkpoint.require_checkpoint(_WORKDIR.value)
      write.warn_if_config_differs(cfg, _WORKDIR.value, _CHECKPOINT.value)
    write.export_run(_WORKDIR.value, _CHECKPOINT.value, _OUTPUT.value, _NAME.value,
                     _OVERWRITE.value)
    multihost.barrier("end of export")


def _predict_from_file() -> None:
  """--mode=predict --model: the file is read and checked before JAX starts."""
  model = from_file.load(_MODEL.value, _MODELS_DIR.value, _ENGINE.value)
  with _start_processes(model.cfg, None):
    from_file.predict_files(model, _INPUT.value, _OUTPUT.value, _ENGINE.value,
                            _OVERWRITE.value, _PROBABILITIES.value)
    multihost.barrier("end of prediction")


def _command_line_config():
  """--config with its overrides, its components' file paths made absolute as a run's are."""
  cfg = _CONFIG.value
  config_file = flags.FLAGS["config"].config_filename
  components.absolute_specs(cfg, os.path.dirname(os.path.abspath(config_file.partition(":")[0])))
  return cfg


def _run_config() -> None:
  """Every mode that reads a config file: train, evaluate, predict from a run."""
  cfg = _command_line_config()
  config_file = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or default_workdir(config_file)
  with _start_processes(cfg, workdir):
    run = _check_before_data(cfg, workdir)
    par = strategies.make_parallel(cfg.parallel.strategy, cfg.parallel.num_devices)
    if _MODE.value == "train":
      os.makedirs(workdir, exist_ok=True)
      _train(run, workdir, par)
    elif _MODE.value == "evaluate":
      modes.evaluate_checkpoint(run, workdir, par, _CHECKPOINT.value)
    else:
      modes.predict_checkpoint(run, workdir, par, _INPUT.value, _OUTPUT.value,
                               _CHECKPOINT.value, _OVERWRITE.value, _PROBABILITIES.value)
    # Process 0 writes the last files alone; the others wait here rather than in JAX's
    # shutdown, whose timeout is shorter than a slow disk.
    multihost.barrier("end of run")


def _train(run: settings.RunSettings, workdir: str, par: strategies.Parallel) -> None:
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
      loop.train_and_evaluate(run, workdir, par, _FROM_SCRATCH.value, life)
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


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  try:
    if not _without_config():
      _run_config()
    elif _MODE.value == "export":
      _export()
    else:
      _predict_from_file()
  except MedsegError as e:
    logging.flush()
    cli.fail(str(e), e.exit_code)


def run() -> None:
  """The `medseg-jax` command: `python -m medseg_jax.main` with the same flags and help."""
  main_module = sys.modules["__main__"]
  if main_module.__name__ != __name__:  # absl's --help shows the script's doc and flags
    main_module.__doc__ = __doc__
    for flag in flags.FLAGS.get_key_flags_for_module(__name__):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main, flags_parser=cli.flags_parser(_check_flags, _without_config))


if __name__ == "__main__":
  run()
