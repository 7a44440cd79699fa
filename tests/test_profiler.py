"""Profiling: a tiny training with two of its steps traced, the trace files read back as
bytes and JSON; a bad `monitor.profile_steps` through `medseg_jax.main`."""

import glob
import gzip
import json
import os
import socket
import subprocess
import sys

import pytest

import helpers
from helpers import REPO, TINY


def test_two_traced_steps_write_a_trace_with_their_step_annotations(tmp_path):
  workdir = str(tmp_path)
  cfg = helpers.config(*TINY[1:], "--config.parallel.num_devices=2",
                       "--config.train.num_steps=4", "--config.train.eval_every_steps=0",
                       "--config.monitor.enabled=False", "--config.monitor.profile_steps=(2, 3)")
  helpers.train(cfg, workdir)
  sessions = glob.glob(os.path.join(workdir, "tensorboard", "plugins", "profile", "*"))
  assert len(sessions) == 1, sessions  # one trace session for the two steps
  # TensorBoard's profile tab reads <host>.xplane.pb (an XSpace protobuf, which holds
  # the annotation's name and argument name as strings).
  with open(os.path.join(sessions[0], f"{socket.gethostname()}.xplane.pb"), "rb") as f:
    xspace = f.read()
  assert b"train" in xspace and b"step_num" in xspace
  with gzip.open(os.path.join(sessions[0], "perfetto_trace.json.gz")) as f:
    events = json.load(f)["traceEvents"]
  annotations = [e for e in events if e.get("name") == "train"]
  assert [e["args"]["step_num"] for e in annotations] == ["2", "3"]
  # The work step 3 dispatched ran inside the trace: events of the runtime's threads
  # (not the Python thread that annotates) from the start of step 3 on.
  python, last = annotations[-1]["tid"], annotations[-1]["ts"]
  assert any(e.get("ph") == "X" and e["tid"] != python and e["ts"] >= last for e in events)


@pytest.mark.parametrize("value", ["(0, 1)", "(3, 5)", "(2.5,)", "(True,)"])
def test_bad_profile_steps_are_one_line_exit_2(tmp_path, value):
  proc = subprocess.run(
      [sys.executable, "-m", "medseg_jax.main", *TINY, f"--workdir={tmp_path / 'run'}",
       f"--config.monitor.profile_steps={value}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: monitor.profile_steps="), lines[0]
  assert not (tmp_path / "run").exists()
