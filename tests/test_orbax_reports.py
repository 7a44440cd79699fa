"""What orbax leaves behind after a failed read is dropped from the logs; everything else
asyncio reports still shows."""

import logging

from medseg_jax.training import orbax_reports


def _error_raised_in(filename: str) -> ValueError:
  """A ValueError whose traceback has a frame in a file named `filename`."""
  try:
    exec(compile("raise ValueError('OUT_OF_RANGE: Error reading byte range')", filename,
                 "exec"))
  except ValueError as e:
    return e
  raise AssertionError("not raised")


def _task_record(error: BaseException) -> logging.LogRecord:
  """asyncio's record of a task whose exception nobody retrieved."""
  return logging.LogRecord("asyncio", logging.ERROR, "/usr/lib/asyncio/base_events.py", 1771,
                           "Task exception was never retrieved", (),
                           (type(error), error, error.__traceback__))


def test_an_abandoned_orbax_read_is_dropped():
  error = _error_raised_in("/site-packages/orbax/checkpoint/_src/serialization/x.py")
  assert not orbax_reports._RECORDS.filter(_task_record(error))


def test_a_task_failing_elsewhere_still_shows():
  error = _error_raised_in("/home/user/my_plugin.py")
  assert orbax_reports._RECORDS.filter(_task_record(error))
  plain = logging.LogRecord("asyncio", logging.ERROR, "base_events.py", 1, "other", (), None)
  assert orbax_reports._RECORDS.filter(plain)
