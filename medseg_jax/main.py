"""Entry point: medseg-jax (or python -m medseg_jax.main) --config=configs/NAME.py [--workdir=DIR] [--mode=...];
--mode=export --workdir=DIR and --mode=predict --model=FILE need no --config (export takes
one, and says where it differs from the checkpoint's)."""

import sys

from absl import app, flags, logging

from medseg_jax import cli, modelfile
from medseg_jax.errors import MedsegError

MODES = ("train", "evaluate", "predict", "export")

_CONFIG = cli.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs; "
                                "default runs/<config file name>. export: several, "
                                "comma-separated, make one ensemble file.")
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
                             "the zoo, instead of a run (no --config, no --workdir); several, "
                             "comma-separated, average their probabilities (an ensemble).")
_MODELS_DIR = flags.DEFINE_string("models_dir", None, "The zoo's directory for --model=NAME; "
                                  "default $MEDSEG_MODELS, else ~/.cache/medseg_jax/models.")
_ENGINE = flags.DEFINE_enum("engine", "auto", modelfile.ENGINES,
                            "predict --model: auto (onnxruntime for one process on a CPU when "
                            "the file has an ONNX graph, else jax), jax (every device, GPUs "
                            "included; the same bytes as the run's checkpoint) or onnxruntime "
                            "(CPU, one process).")
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
  if flags.FLAGS["engine"].present and _MODEL.value is None:
    cli.fail(f"--engine={_ENGINE.value}: only with --model", 2)
  if _LOCAL_DEVICES.value and not all(i.isdigit() for i in _LOCAL_DEVICES.value):
    cli.fail(f"--local_device_ids={','.join(_LOCAL_DEVICES.value)}: device numbers, "
             "comma-separated", 2)


def _command():
  """The command line, read; imports JAX and the training stack (`commands`) only now,
  after the flags and the config file have been read and checked."""
  from medseg_jax import commands  # pylint: disable=import-outside-toplevel
  config_flag = flags.FLAGS["config"]
  return commands.run, commands.Command(
      mode=_MODE.value, config=_CONFIG.value if config_flag.present else None,
      config_file=config_flag.config_filename if config_flag.present else None,
      workdir=_WORKDIR.value, input=_INPUT.value, output=_OUTPUT.value,
      checkpoint=_CHECKPOINT.value, overwrite=_OVERWRITE.value, model=_MODEL.value,
      models_dir=_MODELS_DIR.value, engine=_ENGINE.value, name=_NAME.value,
      probabilities=_PROBABILITIES.value, from_scratch=_FROM_SCRATCH.value,
      coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value, local_device_ids=_LOCAL_DEVICES.value)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  try:
    run, command = _command()
    run(command)
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
