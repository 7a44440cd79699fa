"""Entry point: python -m medseg_jax.main --config=configs/NAME.py --workdir=DIR [--mode=...]."""

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from medseg_jax.errors import ConfigError, MedsegError

MODES = ("train", "evaluate", "predict")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES,
                          "train (then test), evaluate a checkpoint, or predict NIfTI files.")
_INPUT = flags.DEFINE_string("input", None, "predict: a NIfTI file or a directory of them.")
_OUTPUT = flags.DEFINE_string("output", None, "predict: output file (*.nii.gz) or directory.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "latest",
                                  "evaluate/predict: 'latest', 'best' (validation Dice) or a step.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "predict: replace existing outputs.")
_PROBABILITIES = flags.DEFINE_bool("probabilities", False,
                                   "predict: also write per-class probability maps.")


def _fail(message: str, code: int) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags; any problem with them or the config is one line and exit code 2."""
  config_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), None)
  if config_arg is None:
    _fail("--config is required", 2)
  if not os.path.isfile(config_arg.split(":", 1)[0]):
    _fail(f"--config: config file {config_arg.split(':', 1)[0]!r} not found", 2)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0], 2)
  except (AttributeError, KeyError):  # config_flags' way of saying an override key is unknown
    _fail(_unknown_override(config_arg, argv), 2)
  if not _WORKDIR.value:
    _fail("--workdir is required", 2)
  if _MODE.value == "predict" and not (_INPUT.value and _OUTPUT.value):
    _fail("--mode=predict needs --input and --output", 2)
  if _CHECKPOINT.value not in ("latest", "best") and not _CHECKPOINT.value.isdigit():
    _fail(f"--checkpoint={_CHECKPOINT.value}: use 'latest', 'best' or a step number", 2)
  return rest


def _unknown_override(config_arg: str, argv: list[str]) -> str:
  """Names the first --config.KEY=VALUE whose KEY is not in the config."""
  path, _, variant = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("_medseg_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(variant) if variant else module.get_config()
  for arg in argv:
    if arg.startswith("--config."):
      key = arg[len("--config."):].split("=", 1)[0]
      node = cfg
      for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
          return f"{arg}: {path} has no config key {key!r}"
        node = node[part]
  return f"{path}: an override names an unknown config key"


class _QuietLibraries:
  """Keeps the console to medseg_jax's own lines: library INFO chatter is dropped."""

  NOISY = ("/orbax/", "/jax/_src/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # jax and the training code are imported only after the flags are good.
  from medseg_jax import infer, train  # pylint: disable=import-outside-toplevel

  cfg, workdir = _CONFIG.value, _WORKDIR.value
  try:
    if _MODE.value == "train":
      os.makedirs(workdir, exist_ok=True)
      train.train_and_evaluate(cfg, workdir)
    elif _MODE.value == "evaluate":
      train.evaluate_checkpoint(cfg, workdir, _CHECKPOINT.value)
    else:
      infer.predict(cfg, workdir, _INPUT.value, _OUTPUT.value, _CHECKPOINT.value,
                    _OVERWRITE.value, _PROBABILITIES.value)
  except MedsegError as e:
    logging.flush()
    _fail(str(e), e.exit_code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
