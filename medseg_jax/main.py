"""Entry point: python -m medseg_jax.main --config=configs/NAME.py [--workdir=DIR] [--mode=...]."""

import os

import jax
from absl import app, flags, logging

from medseg_jax import cli, components, config
from medseg_jax.data import pipeline
from medseg_jax.errors import ConfigError, MedsegError
from medseg_jax.parallel import distributed, multihost, strategies
from medseg_jax.training import checkpoint, loop, modes

MODES = ("train", "evaluate", "predict")

_CONFIG = cli.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs; "
                                "default runs/<config file name>.")
_MODE = flags.DEFINE_enum("mode", "train", MODES,
                          "train (then test), evaluate a checkpoint, or predict NIfTI files.")
_INPUT = flags.DEFINE_string("input", None, "predict: a NIfTI file or a directory of them.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output file (*.nii.gz) or directory.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest",
                                  "evaluate/predict: 'latest', 'best' (validation Dice) or a step.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "predict: replace existing outputs.")
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


def _check_flags() -> None:
  if _MODE.value == "predict" and not (_INPUT.value and _OUTPUT.value):
    cli.fail("--mode=predict needs --input and --output", 2)
  try:
    checkpoint.parse_which(_CHECKPOINT.value, "--checkpoint")
  except ConfigError as e:
    cli.fail(str(e), e.exit_code)
  if _LOCAL_DEVICES.value and not all(i.isdigit() for i in _LOCAL_DEVICES.value):
    cli.fail(f"--local_device_ids={','.join(_LOCAL_DEVICES.value)}: device numbers, "
             "comma-separated", 2)


def _start_processes(cfg, workdir: str):
  """GPU memory settings, then the process group; only process 0 keeps INFO logs.

  Returns the context inside which the loss of another process ends this one with one
  line and exit code 75 (distributed.PeerWatch).
  """
  distributed.configure_memory(cfg.parallel.gpu_preallocate, cfg.parallel.gpu_memory_fraction)
  launch = distributed.detect(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  local = [int(i) for i in _LOCAL_DEVICES.value] if _LOCAL_DEVICES.value else None
  watch = distributed.initialize(launch, local, cfg.parallel.distributed_timeout_seconds,
                                 checkpoint.directory(workdir))
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  return watch


def default_workdir(config_arg: str) -> str:
  """runs/<config file name>: `configs/unet_brats.py` (or `...py:VARIANT`) -> runs/unet_brats."""
  path, _, variant = config_arg.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


def _check_before_data(cfg, workdir: str) -> strategies.Parallel:
  """The whole config, and the dataset directory when the mode reads it, before anything
  reads the data or writes into the workdir; returns the devices the config asks for."""
  # model.init_from is read only by a training run that does not resume.
  starts_fresh = _MODE.value == "train" and (_FROM_SCRATCH.value
                                             or not checkpoint.has_checkpoint(workdir))
  par = config.check(cfg, starts_fresh)
  if _MODE.value != "predict":  # predict reads the run's data_info.json, not the dataset
    pipeline.check_dataset_root(cfg, workdir)
  if not _WORKDIR.value:
    logging.info("Workdir: %s (the default for --config=%s)", workdir,
                 flags.FLAGS["config"].config_filename)
  return par


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  cfg = _CONFIG.value
  config_file = flags.FLAGS["config"].config_filename
  components.absolute_specs(cfg, os.path.dirname(os.path.abspath(config_file.partition(":")[0])))
  workdir = _WORKDIR.value or default_workdir(config_file)
  try:
    with _start_processes(cfg, workdir):
      par = _check_before_data(cfg, workdir)
      if _MODE.value == "train":
        os.makedirs(workdir, exist_ok=True)
        loop.train_and_evaluate(cfg, workdir, par, _FROM_SCRATCH.value)
      elif _MODE.value == "evaluate":
        modes.evaluate_checkpoint(cfg, workdir, par, _CHECKPOINT.value)
      else:
        modes.predict_checkpoint(cfg, workdir, par, _INPUT.value, _OUTPUT.value,
                                 _CHECKPOINT.value, _OVERWRITE.value, _PROBABILITIES.value)
      # Process 0 writes the last files alone; the others wait here rather than in JAX's
      # shutdown, whose timeout is shorter than a slow disk.
      multihost.barrier("end of run")
  except MedsegError as e:
    logging.flush()
    cli.fail(str(e), e.exit_code)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser(_check_flags))
