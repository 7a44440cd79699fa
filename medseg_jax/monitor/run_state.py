"""How a training run is doing, in files that other programs (the dashboard) read.

Every process of a run keeps WORKDIR/processes/<index>.json: its host and pid, a
heartbeat rewritten by a timer thread every HEARTBEAT_SECONDS (compilation and long
validations included, which a per-step signal would not cover), and, once it ends, how
it ended: the reason and the exit code. A run's status follows from these files:
running while a heartbeat is fresh, else what the processes recorded, else (no record,
no heartbeat) a process was lost without a word (SIGKILL, the machine gone).

WORKDIR/stop_request asks a running run to stop as a signal would: process 0 polls it,
every process stops after the same step with a checkpoint, and the same command resumes.
Process 0 removes an earlier run's request as it starts.

No JAX here: the dashboard reads these files without starting it.
"""

import contextlib
import json
import os
import socket
import threading
import time
from typing import Callable

from medseg_jax import files

HEARTBEAT_SECONDS = 5.0
# A heartbeat older than this many intervals (plus a margin for a busy disk) is stale.
STALE_AFTER = 3
STALE_MARGIN_SECONDS = 10.0
PROCESSES = "processes"
STOP_REQUEST = "stop_request"

RUNNING, FINISHED, STOPPED, FAILED, DIVERGED, LOST = (
    "running", "finished", "stopped", "failed", "diverged", "lost process")
STATUSES = (RUNNING, FINISHED, STOPPED, FAILED, DIVERGED, LOST)
# When processes end differently, the status shown is the first of these they record.
_PRECEDENCE = (DIVERGED, FAILED, LOST, STOPPED, FINISHED)


def process_path(workdir: str, index: int) -> str:
  return os.path.join(workdir, PROCESSES, f"{index}.json")


def stop_request_path(workdir: str) -> str:
  return os.path.join(workdir, STOP_REQUEST)


class Lifetime:
  """One process's record in a run: a heartbeat from a timer thread while it lives, then
  how it ended (`end`). The first `end` counts: a later one (an exit path that runs after
  another has recorded the cause) is ignored."""

  def __init__(self, workdir: str, index: int, count: int,
               on_end: Callable[[dict], None] | None = None,
               interval: float = HEARTBEAT_SECONDS):
    """Process `index` of `count`. As it starts, before its first heartbeat (so before
    anyone can see the run running and ask it to stop), process 0 drops what an earlier
    run of the workdir left: a stop request, and the records of processes beyond
    `count`. `on_end` gets the end's record (to keep it in the manifest too)."""
    self.path, self.interval, self._on_end = process_path(workdir, index), interval, on_end
    self._dropped = ([stop_request_path(workdir)]
                     + [process_path(workdir, int(p["process"]))
                        for p in read_processes(workdir) if p["process"] >= count]
                     if index == 0 else [])
    self._record = {"process": index, "host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.time(), "heartbeat_seconds": interval, "end": None}
    self._lock = threading.Lock()
    self._halt = threading.Event()
    self._thread = threading.Thread(target=self._beat, daemon=True,
                                    name="medseg-heartbeat")

  def __enter__(self) -> "Lifetime":
    for path in self._dropped:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    self._write()
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._halt.set()

  def _beat(self) -> None:
    while not self._halt.wait(self.interval):
      try:
        self._write()
      except Exception:  # pylint: disable=broad-except  (a heartbeat never stops training)
        pass

  def _write(self) -> None:
    with self._lock:
      if self._record["end"] is None:
        self._record["heartbeat"] = time.time()
        files.write_json(self.path, self._record)

  def end(self, reason: str, exit_code: int, message: str = "") -> None:
    """Records how this process ended (a status of STATUSES other than RUNNING), its exit
    code and a line saying why; no heartbeat follows."""
    with self._lock:
      if self._record["end"] is not None:
        return
      self._halt.set()
      self._record["end"] = {"reason": reason, "exit_code": exit_code, "message": message,
                             "time": time.time()}
      self._record["heartbeat"] = time.time()
      try:
        files.write_json(self.path, self._record)
        if self._on_end is not None:
          self._on_end(dict(self._record["end"], process=self._record["process"]))
      except Exception:  # pylint: disable=broad-except  (the exit's own error line counts)
        pass


def read_processes(workdir: str) -> list[dict]:
  """Every process's record, by index; a file being rewritten or damaged is skipped."""
  directory = os.path.join(workdir, PROCESSES)
  out = []
  for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
    if not name.endswith(".json") or name.startswith("."):
      continue
    try:
      with open(os.path.join(directory, name)) as f:
        record = json.load(f)
    except (OSError, ValueError):
      continue
    if isinstance(record, dict) and isinstance(record.get("process"), int):
      out.append(record)
  return sorted(out, key=lambda r: r["process"])


def fresh(record: dict, now: float) -> bool:
  """Whether a process's heartbeat says it lives (and it has recorded no end)."""
  if record.get("end"):
    return False
  interval = float(record.get("heartbeat_seconds") or HEARTBEAT_SECONDS)
  return now - float(record.get("heartbeat", 0)) <= STALE_AFTER * interval + STALE_MARGIN_SECONDS


def status(processes: list[dict], now: float | None = None) -> tuple[str | None, str]:
  """(status, a line saying why) of a run from its processes' records; (None, "") for a
  run that kept none (one trained before these records existed).

  Running while every process lives. Once one has ended: what the processes recorded
  (the first of diverged, failed, lost process, stopped, finished); a process with
  neither a record nor a fresh heartbeat was lost without a word."""
  if not processes:
    return None, ""
  now = time.time() if now is None else now
  alive = [p for p in processes if fresh(p, now)]
  ended = [p for p in processes if p.get("end")]
  silent = [p for p in processes if p not in alive and p not in ended]
  if alive and not ended and not silent:
    return RUNNING, ""
  if silent and not ended:
    p = silent[0]
    if alive:
      return RUNNING, (f"process {p['process']} ({p.get('host')}) silent since "
                       f"{_clock(p.get('heartbeat'))}")
    return LOST, (f"process {p['process']} ({p.get('host')}) stopped without a record "
                  f"after {_clock(p.get('heartbeat'))} (killed, or its machine lost)")
  if alive:  # one has ended, the others are still ending (or hang)
    return RUNNING, _why(ended)
  return _worst(ended), _why(ended)


def _worst(ended: list[dict]) -> str:
  reasons = [p["end"].get("reason") for p in ended]
  return next((r for r in _PRECEDENCE if r in reasons), FAILED)


def _why(ended: list[dict]) -> str:
  worst = _worst(ended)
  p = next((p for p in ended if p["end"].get("reason") == worst), ended[0])
  end = p["end"]
  return f"process {p['process']}: exit {end.get('exit_code')}" + (
      f", {end['message']}" if end.get("message") else "")


def _clock(stamp) -> str:
  try:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(stamp)))
  except (TypeError, ValueError):
    return "its start"
