"""What the dashboard knows of the runs under a directory, read from their files only.

A run is a directory holding a manifest.json or a processes/ directory (the records of
`monitor.run_state`). Every file is read as it may be while a run writes it: a JSON file
mid-rewrite or a half-written last line of metrics.jsonl is skipped, never an error.
"""

import dataclasses
import json
import os
import re
import shlex
import time

from medseg_jax.monitor import run_state

# Directories inside a run that hold no runs (skipped when looking for runs).
_NOT_RUNS = {"checkpoints", "tensorboard", "data", "eval", "processes", "slice_cache",
             "volume_cache", "profile", "predictions"}
MAX_DEPTH = 4
LOG = "train.log"
LOG_TAIL_BYTES = 16_384


def find(root: str) -> list[str]:
  """The runs under `root`, as paths relative to it ('.' for `root` itself), sorted."""
  found = []
  root = os.path.abspath(root)
  for directory, subdirs, names in os.walk(root):
    depth = os.path.relpath(directory, root).count(os.sep) + (directory != root)
    if "manifest.json" in names or run_state.PROCESSES in subdirs:
      found.append(os.path.relpath(directory, root))
    subdirs[:] = sorted(d for d in subdirs if d not in _NOT_RUNS and not d.startswith(".")
                        and depth < MAX_DEPTH)
  return sorted(found)


def _finite(constant: str) -> None:
  """NaN and infinities (a diverged loss) read as None: the pages' JSON has no such values."""
  del constant


def read_json(path: str) -> dict | None:
  """The JSON object in `path`, or None if it is missing, being rewritten or damaged."""
  try:
    with open(path) as f:
      value = json.load(f, parse_constant=_finite)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


class Records:
  """metrics.jsonl, read incrementally: only whole lines, from where the last read
  stopped; a file that shrank (a resumed run drops the records after its checkpoint) is
  read again from its start."""

  def __init__(self, path: str):
    self.path, self.records, self._offset = path, [], 0

  def refresh(self) -> list[dict]:
    try:
      size = os.path.getsize(self.path)
    except OSError:
      self.records, self._offset = [], 0
      return self.records
    if size < self._offset:
      self.records, self._offset = [], 0
    with open(self.path, "rb") as f:
      f.seek(self._offset)
      chunk = f.read(size - self._offset)
    whole = chunk[:chunk.rfind(b"\n") + 1]  # a last line without its newline is unfinished
    self._offset += len(whole)
    for line in whole.splitlines():
      try:
        record = json.loads(line, parse_constant=_finite)
      except ValueError:
        continue
      if isinstance(record, dict) and isinstance(record.get("step"), int):
        self.records.append(record)
    return self.records


def config_name(manifest: dict, fallback: str) -> str:
  """The config file the run was started with (`--config=...`), else `fallback`."""
  argv = ((manifest.get("command") or {}).get("argv")) or []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return os.path.basename(arg.split("=", 1)[1])
    if arg == "--config" and i + 1 < len(argv):
      return os.path.basename(argv[i + 1])
  return fallback


@dataclasses.dataclass(frozen=True)
class Run:
  """What a run's files say when read: its manifest ({} if unreadable) and its processes'
  records."""

  workdir: str
  manifest: dict
  processes: list[dict]


def read(workdir: str) -> Run:
  return Run(workdir, read_json(os.path.join(workdir, "manifest.json")) or {},
             run_state.read_processes(workdir))


def status(run: Run, now: float) -> tuple[str, str]:
  """The run's status (run_state.STATUSES) and why; a run older than the processes'
  records is finished when its manifest has test metrics, else unknown."""
  found, why = run_state.status(run.processes, now)
  if found is not None:
    return found, why
  if (run.manifest.get("final_metrics") or {}).get("test"):
    return run_state.FINISHED, "recorded before runs kept processes' records"
  return "unknown", "no record of its processes"


def summary(name: str, run: Run, records: list[dict], now: float | None = None) -> dict:
  """A run's row on the runs page."""
  state, why = status(run, time.time() if now is None else now)
  manifest = run.manifest
  training = manifest.get("training") or {}
  train = [r for r in records if "loss" in r]
  val = [r["val_dice"] for r in records if isinstance(r.get("val_dice"), (int, float))]
  step = records[-1]["step"] if records else 0
  total = training.get("steps")
  step_time = train[-1].get("step_time") if train else None
  eta = ((total - step) * step_time if state == run_state.RUNNING and total and step_time
         else None)
  test = (manifest.get("final_metrics") or {}).get("test") or {}
  return {"name": name, "status": state, "why": why,
          "config": config_name(manifest, os.path.basename(os.path.abspath(run.workdir))),
          "network": (manifest.get("model") or {}).get("name"),
          "devices": training.get("devices"),
          "hosts": len({p.get("host") for p in run.processes}) or None,
          "processes": training.get("processes"),
          "step": step, "total_steps": total, "eta_seconds": eta,
          "loss": train[-1]["loss"] if train else None,
          "best_val_dice": max(val) if val else None,
          "test_dice": test.get("dice"),
          "started": manifest.get("started"),
          "updated": max((p.get("heartbeat", 0) for p in run.processes), default=None)}


def checkpoints(workdir: str) -> list[dict]:
  """The finalised checkpoints (orbax's step directories) with their metrics."""
  directory = os.path.join(workdir, "checkpoints")
  out = []
  for name in os.listdir(directory) if os.path.isdir(directory) else []:
    path = os.path.join(directory, name)
    if not name.isdigit() or not os.path.isdir(path):
      continue
    metrics = read_json(os.path.join(path, "metrics", "metrics"))
    out.append({"step": int(name), "metrics": metrics})
  return sorted(out, key=lambda c: c["step"])


def newest_montage(workdir: str) -> str | None:
  """The newest validation montage's path relative to the workdir, if any."""
  directory = os.path.join(workdir, "eval", "montage")
  pattern = re.compile(r"val_step(\d+)\.png$")
  found = [(int(m.group(1)), n) for n in (os.listdir(directory) if os.path.isdir(directory)
                                          else []) if (m := pattern.match(n))]
  return os.path.join("eval", "montage", max(found)[1]) if found else None


def log_tail(workdir: str, limit: int = LOG_TAIL_BYTES) -> str:
  """The end of the run's log (process 0's, WORKDIR/train.log), whole lines only."""
  try:
    with open(os.path.join(workdir, LOG), "rb") as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      f.seek(max(0, size - limit))
      text = f.read().decode(errors="replace")
  except OSError:
    return ""
  return text if size <= limit else text[text.find("\n") + 1:]


def resume_command(manifest: dict) -> dict | None:
  """How to start the run again as it was started: {"argv", "cwd", "shell"} (the
  launcher's command line when a launcher started it), or None if it was not recorded."""
  command = manifest.get("command") or {}
  launcher = command.get("launcher")
  if launcher and launcher.get("command"):
    argv, cwd = shlex.split(launcher["command"]), launcher.get("cwd") or command.get("cwd")
  elif command.get("argv"):
    argv, cwd = list(command["argv"]), command.get("cwd")
  else:
    return None
  return {"argv": argv, "cwd": cwd, "shell": f"cd {shlex.quote(cwd or '.')} && {shlex.join(argv)}"}
