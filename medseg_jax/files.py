"""Small file helpers: outputs appear whole or not at all."""

import json
import os


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (a temporary file renamed into place)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


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
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
