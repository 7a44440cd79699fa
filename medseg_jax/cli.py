"""Shared command-line plumbing: config flag parsing with one-line errors, quiet logs."""

import os
import re
import sys
from typing import Callable, Iterator

from absl import app, flags, logging
from ml_collections import config_flags

from medseg_jax import config_schema
from medseg_jax.errors import ConfigError, MedsegError, first_line


def fail(message: str, code: int) -> None:
  """Prints one `error:` line and exits with `code`."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def flags_parser(check: Callable[[], None] | None = None,
                 config_optional: Callable[[], bool] | None = None
                 ) -> Callable[[list[str]], list[str]]:
  """An absl `flags_parser` for every flag form absl reads: any problem with the flags, the
  config file, its keys or its overrides is one line and exit code 2. `check` validates
  the parsed flags further. `--config` is required unless `config_optional()` says the
  command line needs none (a command that reads a saved config instead)."""
  def parse(argv: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(argv)  # --help and its kin print and exit here
    except flags.Error as e:
      fail(first_line(e), 2)
    # config_flags' ways of saying an override key is unknown (AttributeError, KeyError)
    # or that an overridden config file is missing (OSError).
    except (AttributeError, KeyError, OSError):
      fail(_override_error(argv), 2)
    if "config" in flags.FLAGS:  # a command without a config (the zoo) has no --config
      _check_config_flag(flags.FLAGS["config"], config_optional)
    if check is not None:
      check()
    return rest
  return parse


def _check_config_flag(config: flags.Flag, optional: Callable[[], bool] | None) -> None:
  if not config.present and optional is not None and optional():
    return
  if not config.present:
    fail("--config is required", 2)
  path = config.config_filename.split(":", 1)[0]
  if not os.path.isfile(path):
    fail(f"--config: config file {path!r} not found", 2)
  try:
    config_schema.check_keys(config.value, path)
  except ConfigError as e:
    fail(str(e), e.exit_code)



def _flag_arguments(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS
                    ) -> Iterator[tuple[str, str | None, str]]:
  """(flag name, value or None, the argument as `--name[=value]`) for each flag argument of
  `argv[1:]`, flag files expanded, paired with its value as absl's parser pairs them: after
  `=`, or the next argument unless the flag is boolean. absl does not expose its pairing;
  the tools need it to pass a command line's config arguments on in one form."""
  args = iter(flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False))
  for arg in args:
    if arg == "--":
      return
    if not arg.startswith("-") or not arg.strip("-"):
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    known = flag_values[name] if name in flag_values else None
    if not eq and known is not None and not known.boolean:
      value, eq = next(args, ""), "="
    yield name, value if eq else None, f"--{name}{eq}{value}"


def config_args(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """The --config and --config.KEY arguments of a parsed command line, each one argument
  (`--config=FILE`, `--config.KEY=VALUE`, a boolean's `--config.KEY`/`--noconfig.KEY`),
  whatever form absl read them in: to pass on to another command. `flag_values` are the
  flags `argv` was parsed into."""
  return [arg for name, _, arg in _flag_arguments(argv, flag_values)
          if re.fullmatch(r"(no)?config(\..+)?", name)]


def _override_error(argv: list[str]) -> str:
  """Names the missing config file, or the first --config.KEY whose KEY is not in it."""
  config_arg = next((v for n, v, _ in _flag_arguments(argv) if n == "config"), None) or ""
  path = config_arg.split(":", 1)[0]
  if not os.path.isfile(path):
    return f"--config: config file {path!r} not found"
  cfg = config_schema.load_config(config_arg)
  for name, _, arg in _flag_arguments(argv):
    if re.fullmatch(r"(no)?config\..+", name):
      key = name.split(".", 1)[1]
      try:
        config_schema.lookup(cfg, key)
      except KeyError:
        return f"{arg}: {path} has no config key {key!r}"
  return f"{path}: an override names an unknown config key"


class _QuietLibraries:
  """Keeps the console to medseg_jax's own lines: library INFO chatter is dropped."""

  NOISY = ("/orbax/", "/jax/_src/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs(handler=None) -> None:
  """Drops library INFO lines from `handler` (default: absl's, the console's)."""
  (handler or logging.get_absl_handler()).addFilter(_QuietLibraries())


def config_flag() -> flags.FlagHolder:
  """Defines --config: an experiment config file, locked, with --config.KEY overrides."""
  return config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                         lock_config=True)


def run(main: Callable[..., None], check: Callable[[], None] | None = None,
        takes_args: bool = False) -> None:
  """Runs `main()` as a command: flags parsed by `flags_parser(check)`, quiet library
  logs, and a MedsegError from `main` printed as one `error:` line with its exit code.
  `main` is handed the positional arguments if it `takes_args`."""
  def run_main(argv: list[str]) -> None:
    quiet_library_logs()
    try:
      if takes_args:
        main(argv[1:])
      else:
        main()
    except MedsegError as e:
      logging.flush()
      fail(str(e), e.exit_code)
  app.run(run_main, flags_parser=flags_parser(check))
