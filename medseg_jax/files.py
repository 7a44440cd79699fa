"""Small file helpers: outputs appear whole or not at all, a full disk is one line, and a
JSON file that is missing or broken is one line too."""

import contextlib
import csv
import errno
import glob
import json
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Iterator

from medseg_jax.errors import DataError, MedsegError, first_line

# Writes that find no room: a full disk, a full quota, the file size limit (RLIMIT_FSIZE).
_NO_ROOM = tuple(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG))


def disk_full(error: BaseException | str | None) -> str | None:
  """Why `error` (an exception, its chain included, or a message) is a write that found no
  room, as the system says it ("No space left on device", ...), or None if it is not.

  Libraries that write in C++ (tensorstore, so orbax too) raise ValueError or
  RuntimeError with the system's message inside, not an OSError with its errno."""
  seen = 0
  while error is not None and seen < 10:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      return os.strerror(error.errno)
    found = next((reason for reason in _NO_ROOM if reason in str(error)), None)
    if found or isinstance(error, str):
      return found
    error, seen = error.__cause__ or error.__context__, seen + 1
  return None


def remove_until_gone(pattern: str, settle_seconds: float, limit_seconds: float,
                      poll_seconds: float = 0.02) -> list[str]:
  """Removes the paths matching the glob `pattern` (escape literal parts with
  `glob.escape`), again whenever one reappears, until none has for `settle_seconds`;
  returns what still matches after `limit_seconds` ([] once gone).

  For what a failed tensorstore write leaves (the slice store's, orbax's): the write
  returns at its first failing chunk while its other chunks may still be landing from
  tensorstore's threads, which has no call that waits for them, and a landing chunk
  recreates its directories, also while `rmtree` is emptying them."""
  start = quiet_since = time.monotonic()
  while (time.monotonic() - quiet_since < settle_seconds
         and time.monotonic() - start < limit_seconds):
    found = glob.glob(pattern)
    for path in found:
      shutil.rmtree(path, ignore_errors=True)
    if found:
      quiet_since = time.monotonic()
    time.sleep(poll_seconds)
  return glob.glob(pattern)


@contextlib.contextmanager
def disk_full_reported(path: str, advice: Callable[[], str] | None = None) -> Iterator[None]:
  """Turns a write into `path` that finds no room into one line: a MedsegError naming
  `path`, saying the disk is full and what to do (`advice()`, asked only then; by default
  free space and run again). Other errors pass unchanged."""
  try:
    yield
  except MedsegError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any writer's error)
    reason = disk_full(e)
    if reason is None:
      raise
    then = advice() if advice else "free space and run again"
    raise MedsegError(f"{path}: disk full ({reason}); {then}") from e


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` (same extension) that replaces `path` only if
  the block succeeds; on failure nothing is left behind, and a full disk is one line."""
  with disk_full_reported(path):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    name = os.path.basename(path)
    suffix = name[name.index("."):] if "." in name else ""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make outputs private
    try:
      yield tmp
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise


def user_cache(*parts: str) -> str:
  """A path under this user's medseg_jax cache: $XDG_CACHE_HOME/medseg_jax, by default
  ~/.cache/medseg_jax."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "medseg_jax", *parts)


def read_json(path: str, what: str, missing_ok: bool = False) -> Any:
  """The JSON value in the file at `path`, which holds `what` (named in errors). A missing
  file is a DataError (None if `missing_ok`), and so is one that cannot be read or is not
  JSON: one line naming the file, what it should hold and what is wrong."""
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError as e:
    if missing_ok:
      return None
    raise DataError(f"{path}: not found ({what})") from e
  except ValueError as e:  # not JSON, or not text
    raise DataError(f"{path}: not JSON ({what}): {first_line(e, 200)}") from e
  except OSError as e:
    raise DataError(f"{path}: unreadable ({what}): {first_line(e, 200)}") from e


def write_json(path: str, obj) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_csv(path: str, rows: list[dict]) -> None:
  """A header from the first row's keys, then one line per row; None becomes empty."""
  with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)


def append_jsonl(path: str, obj) -> None:
  with disk_full_reported(path), open(path, "a") as f:
    f.write(json.dumps(obj, sort_keys=True) + "\n")


def truncate_jsonl(path: str, max_step: int) -> None:
  """Keeps the records of a JSON-lines log whose `step` is at most `max_step`."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line).get("step", 0) <= max_step]
  if len(kept) != len(lines):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
      f.writelines(kept)
