"""A user's network and plugins in real runs: predicted in a fresh process, a plugin's stop
on every process, a plugin that fails, and a component file changed since the checkpoints.
A user's network killed and restarted, and trained by two processes: tests/test_run3d.py
(tests/tiny_net3d.py, named by file)."""

import os
import socket
import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np
import pytest

import helpers
from helpers import REPO, TINY, env_with_devices

# A network of the user's own, with dropout so that the step rng matters for resume.
NET = """
import flax.linen as nn

class Net(nn.Module):
  num_classes: int
  width: int = 6
  dtype: object = None
  axis_name: object = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME")(x))
    x = nn.Dropout(0.2, deterministic=not train)(x)
    x = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME")(x))
    return nn.Conv(self.num_classes, (1, 1))(x)
"""

PLUGINS = """
import json, os

class StopAt:
  def __init__(self, context, step=3):
    self.context, self.step = context, step

  def on_log(self, step, metrics):
    self._note("on_log", step)
    return f"asked at step {step}" if step == self.step else None

  def on_checkpoint(self, step, path):
    self._note("on_checkpoint", step, os.path.isdir(os.path.dirname(path)))

  def on_end(self, step, test_metrics):
    self._note("on_end", step, test_metrics is not None)

  def _note(self, *what):
    path = os.path.join(self.context.workdir, f"hooks{self.context.process_index}.jsonl")
    with open(path, "a") as f:
      f.write(json.dumps(what) + "\\n")

class Fails:
  def __init__(self, context):
    pass

  def on_log(self, step, metrics):
    raise RuntimeError(f"no metrics today (step {step})\\nsecond line")
"""

STEPS = 12
RUN = TINY + ["--config.model.dropout=0.1", "--config.train.eval_every_steps=0",
              "--config.checkpoint.every_steps=4", "--config.monitor.log_every_steps=1",
              "--config.monitor.enabled=False", f"--config.train.num_steps={STEPS}"]


def write(path, source):
  with open(path, "w") as f:
    f.write(textwrap.dedent(source))
  return str(path)


@pytest.fixture(scope="module")
def user_files(tmp_path_factory):
  where = tmp_path_factory.mktemp("components")
  return write(where / "net.py", NET), write(where / "plugins.py", PLUGINS)


def _command(workdir, net, *extra):
  return [sys.executable, "-m", "medseg_jax.main", *RUN, f"--config.model.name={net}:Net",
          f"--workdir={workdir}", *extra]


def _run(workdir, net, *extra, devices=2):
  return subprocess.run(_command(workdir, net, *extra), cwd=REPO,
                        env=env_with_devices(devices), capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, user_files):
  """An uninterrupted run of the user's network, in a process of its own."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(workdir, user_files[0])
  assert proc.returncode == 0, proc.stderr[-3000:]
  return str(workdir)


def test_a_user_network_predicts_in_a_fresh_process_as_in_this_one(reference, user_files,
                                                                   tmp_path):
  images = os.path.join(reference, "data", "imagesTs")
  proc = subprocess.run(_command(reference, user_files[0], "--mode=predict",
                                 f"--input={images}", f"--output={tmp_path / 'fresh'}"),
                        cwd=REPO, env=env_with_devices(1), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg = helpers.config(*RUN[1:], f"--config.model.name={user_files[0]}:Net",
                       "--config.parallel.num_devices=2")
  helpers.predict(cfg, reference, images, str(tmp_path / "here"))
  names = sorted(os.listdir(images))
  assert sorted(os.listdir(tmp_path / "fresh")) == names
  for name in names:
    fresh = nib.load(tmp_path / "fresh" / name)
    here = nib.load(tmp_path / "here" / name)
    assert np.array_equal(fresh.get_fdata(), here.get_fdata())
    assert (fresh.affine == nib.load(os.path.join(images, name)).affine).all()


def test_a_plugin_stop_request_stops_every_process_after_the_same_step(user_files, tmp_path):
  env = dict(env_with_devices(), CPU_DEVICES_PER_PROCESS="2")
  launched = subprocess.run(
      ["bash", "launch/local.sh", "2", *RUN, f"--workdir={tmp_path}",
       f"--config.train.plugins=('{user_files[1]}:StopAt',)"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert launched.returncode == 0, launched.stderr[-3000:]
  stops = [line.split("Stopped at step ")[1].split()[0]
           for line in launched.stderr.splitlines() if "Stopped at step " in line]
  # Process 0 logs at INFO; every process saves the agreed step and ends training there.
  assert len(stops) == 1 and 3 <= int(stops[0]) < STEPS, launched.stderr[-3000:]
  assert "by a plugin: StopAt: asked at step 3" in launched.stderr
  assert os.path.isdir(tmp_path / "checkpoints" / stops[0])
  assert max(int(n) for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()) == int(stops[0])
  assert (tmp_path / "eval" / "test_metrics.json").exists()  # tested, as after early stopping
  with open(tmp_path / "hooks0.jsonl") as f:
    hooks = [line.split(",")[0].strip('["') for line in f]
  assert hooks[-1] == "on_end" and "on_checkpoint" in hooks
  assert not (tmp_path / "hooks1.jsonl").exists()  # process 0 only, by default


def test_a_plugin_that_raises_is_one_error_line_naming_it(user_files, tmp_path):
  proc = _run(tmp_path, user_files[0], f"--config.train.plugins=('{user_files[1]}:Fails',)")
  assert proc.returncode == 1
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines[-1] == (f"error: train.plugins: {user_files[1]}:Fails ({user_files[1]}): on_log "
                       "raised RuntimeError: no metrics today (step 1)")
  assert "Traceback" not in proc.stderr


def test_a_changed_component_file_is_named_when_its_checkpoints_are_read(reference, tmp_path,
                                                                         caplog):
  net = write(tmp_path / "net.py", NET)
  cfg = helpers.config(*RUN[1:], f"--config.model.name={net}:Net", "--config.train.num_steps=1",
                       "--config.parallel.num_devices=2")
  helpers.train(cfg, tmp_path / "run")
  caplog.set_level("WARNING")
  helpers.evaluate(cfg, tmp_path / "run")
  assert "component's source file has changed" not in caplog.text
  write(net, NET + "\n# edited after training\n")
  helpers.evaluate(cfg, tmp_path / "run")
  assert f"its SHA-256 differs): model.name: {net}" in caplog.text


def test_processes_that_read_different_versions_of_a_component_refuse_to_train(tmp_path):
  """Each process imports `usernet` from a directory of its own (another PYTHONPATH), as
  hosts with different copies of a file would: both stop with one line, before any data."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = []
  for index, width in enumerate((6, 7)):
    where = tmp_path / f"host{index}"
    where.mkdir()
    write(where / "usernet.py", NET.replace("width: int = 6", f"width: int = {width}"))
    env = dict(env_with_devices(1), PYTHONPATH=f"{where}{os.pathsep}{REPO}")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "medseg_jax.main", *RUN, f"--workdir={tmp_path / 'run'}",
         "--config.model.name=usernet:Net", f"--coordinator_address=127.0.0.1:{port}",
         "--num_processes=2", f"--process_id={index}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
  errors = [p.communicate(timeout=300)[1] for p in procs]
  for index, (proc, stderr) in enumerate(zip(procs, errors)):
    assert proc.returncode == 2, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last == (f"error: model.name='usernet:Net': the processes read different versions "
                    f"of {tmp_path}/host{index}/usernet.py (its SHA-256 differs between "
                    "processes)")
  assert not (tmp_path / "run").exists()
