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
