"""The dashboard's two actions on a run: ask it to stop, and start a stopped run again.

Stop writes the run's stop request file (`monitor.run_state.STOP_REQUEST`), which the
run's process 0 acts on as on SIGTERM. Resume starts the command the manifest recorded,
in its directory, on this machine, with its output in WORKDIR/resume.log; only for a run
of one machine that has ended and is not running.
"""

import os
import socket
import subprocess
import time

from medseg_jax import files
from medseg_jax.dashboard import runs
from medseg_jax.monitor import run_state

RESUMABLE = (run_state.STOPPED, run_state.FAILED, run_state.LOST)


class Refused(Exception):
  """An action that cannot be taken now; the message says why (HTTP 409)."""


def stop(workdir: str) -> dict:
  """Asks the running run in `workdir` to stop after its current step; returns the
  request file's path."""
  state, _ = runs.status(runs.read(workdir), time.time())
  if state != run_state.RUNNING:
    raise Refused(f"the run is {state}, not running")
  path = run_state.stop_request_path(workdir)
  files.write_json(path, {"time": time.time(), "by": "dashboard"})
  return {"path": path}


def resume(workdir: str) -> dict:
  """Starts the stopped run in `workdir` again with the command that started it; returns
  the command ({"argv", "cwd", "shell"}) and the new process's pid."""
  run = runs.read(workdir)
  command = runs.resume_command(run.manifest)
  state, _ = runs.status(run, time.time())
  if command is None:
    raise Refused("the run's manifest does not record the command that started it")
  if state not in RESUMABLE:
    raise Refused(f"the run is {state}; only a stopped, failed or lost run resumes")
  recorded = run.manifest.get("command") or {}
  if (recorded.get("processes") or 1) > 1 and not recorded.get("launcher"):
    raise Refused(f"the run's {recorded['processes']} processes were started one by one; "
                  f"start each again as before (process 0: {command['shell']})")
  if not local(run.processes):
    raise Refused(f"the run trained on other machines; run there: {command['shell']}")
  log = open(os.path.join(workdir, "resume.log"), "ab")  # pylint: disable=consider-using-with
  try:
    # The launcher's record is the new command's own, not one this server inherited.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSEG_LAUNCHER")}
    process = subprocess.Popen(command["argv"], cwd=command["cwd"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True)
  except OSError as e:
    raise Refused(f"cannot start {command['shell']}: {e.strerror or e}") from e
  finally:
    log.close()
  return dict(command, pid=process.pid)


def local(processes: list[dict]) -> bool:
  """Whether every process of a run (their records) ran on this machine."""
  return {p.get("host") for p in processes} <= {socket.gethostname()}
