"""A process of a 2-process group lost or failing at a chosen point (a plugin that kills
its own process, or raises, on one process at one step; a process never started): the
other ends with one `error:` line naming what happened and a code below 128, without
the runtime's abort, within the bound; after a loss the same command resumes."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import REPO, TINY, env_with_devices

TIMEOUT = 4  # parallel.distributed_timeout_seconds
RUN = TINY + ["--config.model.dropout=0.1", "--config.train.eval_every_steps=0",
              "--config.monitor.log_every_steps=1", "--config.monitor.enabled=False",
              "--config.checkpoint.every_steps=1", "--config.train.num_steps=100000",
              f"--config.parallel.distributed_timeout_seconds={TIMEOUT}"]
NOISE = ("Traceback", "Check failure", "Fatal Python error", "Terminating process",
         "Extension modules:")
HOST = socket.gethostname()

# Once per workdir (a marker file), so that the same command, run again, goes on.
PLUGIN = """
import os, signal

class Ends:
  all_processes = True

  def __init__(self, context):
    self.mine = context.process_index == {process}
    self.marker = os.path.join(context.workdir, "ended_once")

  def {hook}(self, step, _):
    if self.mine and step == {step} and not os.path.exists(self.marker):
      open(self.marker, "w").close()
      {action}
"""
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
RAISE = "raise RuntimeError(f'no luck at step {step}')"


def _plugin(where, process, hook, step, action):
  path = where / "ends.py"
  path.write_text(textwrap.dedent(PLUGIN.format(process=process, hook=hook, step=step,
                                                action=action)))
  return f"--config.train.plugins=('{path}:Ends',)"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, port, process_id, *extra):
  return [sys.executable, "-m", "medseg_jax.main", *RUN, f"--workdir={workdir}", *extra,
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={process_id}"]


def _start(workdir, port, ids, *extra, wrapped=False):
  """The processes `ids` of the pair; through launch/process.sh, as the launchers start
  them, if `wrapped`."""
  wrapper = ["bash", "launch/process.sh"] if wrapped else []
  # A session each: `_kill` ends a wrapped process with its wrapper.
  return [subprocess.Popen([*wrapper, *([str(i)] if wrapped else []),
                            *_command(workdir, port, i, *extra)], cwd=REPO,
                           env=env_with_devices(2), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
          for i in ids]


def _kill(procs):
  for p in procs:
    try:
      os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def _ended(procs, timeout=120):
  """(stderr, seconds since the call) of each process once it has ended."""
  started, ends = time.time(), {}
  try:
    while len(ends) < len(procs):
      assert time.time() - started < timeout, "a process did not end"
      for i, p in enumerate(procs):
        if i not in ends and p.poll() is not None:
          ends[i] = time.time() - started
      time.sleep(0.02)
    return [(p.communicate()[1], ends[i]) for i, p in enumerate(procs)]
  finally:
    _kill(procs)


def _assert_one_line(stderr, code, starts):
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert lines and lines[-1].startswith(starts), stderr[-3000:]
  assert 0 < code < 128, stderr[-3000:]
  for noise in NOISE:
    assert noise not in stderr, stderr[-3000:]
  return lines[-1]


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def _wait_for(path, procs, timeout=120):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      _kill(procs)
      pytest.fail("\n".join(p.communicate()[1][-2000:] for p in procs))
    time.sleep(0.02)


def _resumes(workdir, port, newest, *extra, wrapped=False):
  """The same command on both processes continues from checkpoint `newest` (until a
  SIGTERM to process 1 stops both)."""
  procs = _start(workdir, port, (0, 1), *extra, wrapped=wrapped)
  _wait_for(workdir / "checkpoints" / str(newest + 1), procs)
  procs[1].send_signal(signal.SIGTERM)
  (first, _), (second, _) = _ended(procs)
  assert [p.returncode for p in procs] == [0, 0], first[-2000:] + second[-2000:]
  assert f"Resuming from checkpoint at step {newest} " in first, first[-3000:]


def test_a_process_1_lost_mid_training_ends_process_0_with_one_line(tmp_path):
  """Process 1 is killed as it starts checkpoint 2: process 0 ends within its bound
  (no sign of life for TIMEOUT s, noticed at most two polls later)."""
  port, kill = _free_port(), _plugin(tmp_path, 1, "on_checkpoint", 2, KILL)
  procs = _start(tmp_path / "run", port, (0, 1), kill)
  (stderr, ended), (_, killed) = _ended(procs)
  assert procs[1].returncode == -signal.SIGKILL
  newest = _steps(tmp_path / "run")[-1]
  assert _assert_one_line(stderr, procs[0].returncode, "error:") == (
      f"error: process 1 (host {HOST}) was lost (no sign of life for {TIMEOUT} s); the same "
      f"command on every process restarts the run from checkpoint {newest}")
  assert procs[0].returncode == 75 and ended - killed < TIMEOUT + 10
  _resumes(tmp_path / "run", port, newest, kill)


def test_b_process_0_lost_mid_training_ends_process_1_with_one_line(tmp_path):
  """Process 0, which hosts the coordination service, is killed as it starts checkpoint
  2: process 1's runtime aborts at once, and launch/process.sh (every launcher's way to
  start a process) turns that into one line and exit code 75."""
  port, kill = _free_port(), _plugin(tmp_path, 0, "on_checkpoint", 2, KILL)
  procs = _start(tmp_path / "run", port, (0, 1), kill, wrapped=True)
  (_, killed), (stderr, ended) = _ended(procs)
  assert procs[0].returncode == -signal.SIGKILL or procs[0].returncode == 128 + signal.SIGKILL
  line = _assert_one_line(stderr, procs[1].returncode, "error: process 1 lost the "
                          "coordination service: process 0, which hosts it, was lost")
  assert procs[1].returncode == 75 and ended - killed < TIMEOUT + 10, line
  _resumes(tmp_path / "run", port, _steps(tmp_path / "run")[-1], kill, wrapped=True)


def test_c_a_process_that_never_joins_ends_the_other_with_one_line(tmp_path):
  """Process 1 is never started: process 0 ends after TIMEOUT s, before the runtime's own
  registration deadline would abort it."""
  procs = _start(tmp_path / "run", _free_port(), (0,))
  (stderr, ended), = _ended(procs)
  port = procs[0].args[-3].rsplit(":", 1)[1]
  assert _assert_one_line(stderr, procs[0].returncode, "error:") == (
      f"error: the group of 2 processes did not form at 127.0.0.1:{port} within {TIMEOUT} s "
      "(a process was not started, or ended before joining); no checkpoint yet: the same "
      "command on every process starts the run again")
  assert procs[0].returncode == 75 and ended < TIMEOUT + 20


@pytest.mark.parametrize("failing", [0, 1])
def test_d_a_process_failing_alone_ends_both_with_one_line_each(tmp_path, failing):
  """A plugin raises on one process only: that one ends with its own error line and code
  1, the other with one line naming the failed process and its error, and code 75."""
  fail = _plugin(tmp_path, failing, "on_log", 2, RAISE)
  procs = _start(tmp_path / "run", _free_port(), (0, 1), fail)
  ended = _ended(procs)
  other = 1 - failing
  error = (f"train.plugins: {tmp_path / 'ends.py'}:Ends ({tmp_path / 'ends.py'}): on_log "
           "raised RuntimeError: no luck at step 2")
  assert _assert_one_line(ended[failing][0], procs[failing].returncode, "error:") == (
      f"error: {error}")
  line = _assert_one_line(ended[other][0], procs[other].returncode, "error:")
  assert line.startswith(f"error: process {failing} (host {HOST}) failed: {error}; "
                         "the same command on every process"), line
  assert procs[failing].returncode == 1 and procs[other].returncode == 75
  assert abs(ended[other][1] - ended[failing][1]) < TIMEOUT + 10
