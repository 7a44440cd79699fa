"""Small file helpers: outputs appear whole or not at all."""

import contextlib
import csv
import json
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` (same extension) that replaces `path` only if
  the block succeeds; on failure nothing is left behind."""
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
  with open(path, "a") as f:
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
