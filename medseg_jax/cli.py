"""Shared command-line plumbing: config flag parsing with one-line errors, quiet logs."""

import importlib.util
import os
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from medseg_jax.errors import MedsegError, first_line


def fail(message: str, code: int) -> None:
  """Prints one `error:` line and exits with `code`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


_HELP = {"--help", "-help", "-?", "--helpshort", "--helpfull", "--helpxml"}


def flags_parser(check: Callable[[], None] | None = None) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser`: any problem with the flags or the config file or its
  overrides is one line and exit code 2. `check` validates the parsed flags further."""
  def parse(argv: list[str]) -> list[str]:
    config_arg = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")), "")
    if not _HELP.intersection(argv[1:]):  # absl prints the help and exits while parsing
      if not config_arg:
        fail("--config is required", 2)
      if not os.path.isfile(config_arg.split(":", 1)[0]):
        fail(f"--config: config file {config_arg.split(':', 1)[0]!r} not found", 2)
    try:
      rest = flags.FLAGS(argv)
    except flags.Error as e:
      fail(first_line(e), 2)
    except (AttributeError, KeyError):  # config_flags' way of saying an override key is unknown
      fail(_unknown_override(config_arg, argv), 2)
    if check is not None:
      check()
    return rest
  return parse


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


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def config_flag() -> flags.FlagHolder:
  """Defines --config: an experiment config file, locked, with --config.KEY overrides."""
  return config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                         lock_config=True)


def run(main: Callable[[], None], check: Callable[[], None] | None = None) -> None:
  """Runs `main()` as a command: flags parsed by `flags_parser(check)`, quiet library
  logs, and a MedsegError from `main` printed as one `error:` line with its exit code."""
  def run_main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    try:
      main()
    except MedsegError as e:
      logging.flush()
      fail(str(e), e.exit_code)
  app.run(run_main, flags_parser=flags_parser(check))
