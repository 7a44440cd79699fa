"""Errors a user can cause; `main` turns them into one line and a non-zero exit."""


class MedsegError(Exception):
  """Bad input (data, path, checkpoint) that the user can fix. Exit code 1."""

  exit_code = 1


class ConfigError(MedsegError):
  """A config value or flag that cannot be used. Exit code 2."""

  exit_code = 2


class DataError(MedsegError):
  """A data file (a dataset's, or a run's JSON records) or a directory that cannot be read
  as expected."""


class InvalidDatasetError(DataError):
  """The dataset failed validation; the message lists every problem found. Exit code 2."""

  exit_code = 2


def first_line(error: BaseException, limit: int = 300) -> str:
  """The first line of `error`'s message (its type name if it has none), cut to `limit`
  characters: how a library's exception is quoted inside a one-line error."""
  text = str(error).strip() or type(error).__name__
  return text.splitlines()[0][:limit]
