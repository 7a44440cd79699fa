"""What orbax and tensorstore print about a failed read or write that the Checkpointer
reports itself, as one line (a full disk) or as the exception it raises."""

import logging
import sys
import types

from absl import logging as absl_logging

from medseg_jax import files


class _OrbaxRecords(logging.Filter):
  """Drops log records of three things: orbax's warning that a save has no metrics (only a
  new best has a Dice: periodic saves have none by design), the tracebacks of a write
  that found the disk full, logged by orbax's threads and by asyncio for the operations
  orbax abandoned (see _ClosedLoopCalls), and asyncio's "Task exception was never
  retrieved" for the other reads of a checkpoint orbax gave up on (a truncated file: the
  first failure reaches the Checkpointer, which reports it; the reads still in flight end
  with the same error as tasks nobody awaits, as often as the timing allows)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name != "asyncio" and "/orbax/" not in record.pathname:
      return True
    if record.getMessage().startswith("Requested `tracked_metric`"):
      return False
    error = record.exc_info[1] if record.exc_info else None
    if record.name == "asyncio" and _raised_in_orbax(error):
      return False
    return files.disk_full(error) is None and files.disk_full(record.getMessage()) is None


def _raised_in_orbax(error: BaseException | None) -> bool:
  """Whether `error` was raised in an orbax frame (an operation orbax runs on its loop)."""
  traceback = error.__traceback__ if error is not None else None
  while traceback is not None:
    if "/orbax/" in traceback.tb_frame.f_code.co_filename:
      return True
    traceback = traceback.tb_next
  return False


class _ClosedLoopCalls:
  """An unraisable-exception hook that drops one kind of report and passes on the rest.

  orbax runs each read and write on an event loop of its own, which it closes as soon as
  one of its operations fails (a full disk, a truncated file) while tensorstore's other
  operations are still in flight; each of those, as it completes, calls the closed loop,
  and Python prints the RuntimeError ("Event loop is closed") with a traceback. orbax
  0.12.8 offers no way to wait for them. The failure itself is raised to the thread that
  asked for the read or write, and reported there.
  """

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    error = unraisable.exc_value
    if not (unraisable.object is None and isinstance(error, RuntimeError)
            and str(error) == "Event loop is closed"
            and _last_frame(unraisable.exc_traceback) == "_check_closed"):
      self.previous(unraisable)


def _last_frame(traceback: types.TracebackType | None) -> str | None:
  while traceback is not None and traceback.tb_next is not None:
    traceback = traceback.tb_next
  return traceback.tb_frame.f_code.co_name if traceback is not None else None


_RECORDS = _OrbaxRecords()


def quiet() -> None:
  """Installs both filters, once per process (orbax logs through absl's logger, asyncio
  through its own)."""
  for logger in (absl_logging.get_absl_logger(), logging.getLogger("asyncio")):
    if _RECORDS not in logger.filters:
      logger.addFilter(_RECORDS)
  if not isinstance(sys.unraisablehook, _ClosedLoopCalls):
    sys.unraisablehook = _ClosedLoopCalls(sys.unraisablehook)
