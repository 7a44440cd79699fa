"""Real jax.distributed processes on 127.0.0.1 (gloo collectives on CPU), with timeouts,
against references trained in this process or in one process."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers
from helpers import REPO, TINY as TINY_RUN, checkpoint_arrays, env_with_devices as _env

TINY = TINY_RUN + ["--config.model.dropout=0.1", "--config.train.eval_every_steps=0",
                   "--config.monitor.log_every_steps=1", "--config.checkpoint.every_steps=1"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _params(workdir, step):
  return checkpoint_arrays(workdir, step, "params")


def _one_process(workdir, steps):
  """The loop in this process on 4 devices, as `medseg_jax.main` runs it with TINY."""
  cfg = helpers.config(*TINY[1:], "--config.parallel.num_devices=4",
                       f"--config.train.num_steps={steps}")
  helpers.train(cfg, workdir, False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 2-process x 2-device run to step 2, and an uninterrupted 1 x 4 run to step 3 in
  this process: the reference."""
  two = str(tmp_path_factory.mktemp("two"))
  env = dict(_env(), CPU_DEVICES_PER_PROCESS="2")
  launched = subprocess.run(["bash", "launch/local.sh", "2", *TINY, f"--workdir={two}",
                             "--config.train.num_steps=2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
  single = str(tmp_path_factory.mktemp("one"))
  _one_process(single, 3)
  return two, launched, single


def test_two_processes_train_like_one_with_the_same_global_batch(runs):
  two, launched, single = runs
  assert launched.returncode == 0, launched.stderr[-3000:]
  assert launched.stderr.count("launching process") == 2
  for a, b in zip(_params(two, 2), _params(single, 2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Only process 0 writes the run's files: each step is logged once.
  with open(os.path.join(two, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2]
  # Step 2 was checkpointed and validated (the first validation is always the best so
  # far): one save of step 2, with its Dice.
  assert "val_dice" in records[1]


def test_best_and_periodic_saves_of_the_same_steps_in_two_processes(tmp_path):
  """Each of 8 steps is validated (a new best) and checkpointed by both processes, as when
  a validation and a checkpoint land on one step: one save per step, through one manager."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "tests/checkpoint_pair.py", str(port), str(i),
                             str(tmp_path), "8"], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    errors = [p.communicate(timeout=240)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
  # max_to_keep=3; the best (8, the highest Dice) is among the newest.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7", "8"]
  with open(tmp_path / "checkpoints" / "8" / "metrics" / "metrics") as f:
    assert json.load(f) == {"dice": 0.08}
  # The pair writes parameters all equal to the step.
  for step in (6, 7, 8):
    np.testing.assert_array_equal(_params(tmp_path, step)[0], np.full(256, step, np.float32))


def test_one_process_resumes_a_two_process_run(runs, tmp_path, caplog):
  two, launched, single = runs
  assert launched.returncode == 0, launched.stderr[-3000:]
  shutil.copytree(two, tmp_path / "two")
  two = str(tmp_path / "two")
  caplog.set_level("INFO")
  _one_process(two, 3)
  assert "Resuming from checkpoint at step 2" in caplog.text
  with open(os.path.join(two, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]  # nothing logged twice
  for a, b in zip(_params(two, 3), _params(single, 3)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# Three slices per device: every global batch of the 8-slice volumes differs with the
# device count, and the last is padded.
PREDICT = TINY_RUN + ["--config.train.eval_batch_size=3"]


def test_two_processes_fine_tune_from_a_run_like_one(runs, tmp_path):
  """Each process reads the source run's checkpoint itself: a 2-process run started from
  the reference run (3 classes here, so the head is new) has at step 1 what the same
  fine-tuning in this process has."""
  _, _, single = runs
  tune = [f"--config.model.init_from={single}", "--config.model.init_checkpoint=latest",
          "--config.data.label_map=(0, 1, 2)", "--config.train.num_steps=1"]
  env = dict(_env(), CPU_DEVICES_PER_PROCESS="2")
  launched = subprocess.run(["bash", "launch/local.sh", "2", *TINY, *tune,
                             f"--workdir={tmp_path / 'two'}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
  assert launched.returncode == 0, launched.stderr[-3000:]
  assert f"model.init_from={single}: " in launched.stderr and " 1 new (" in launched.stderr
  helpers.train(helpers.config(*TINY[1:], *tune, "--config.parallel.num_devices=4"),
                          str(tmp_path / "one"), False)
  for a, b in zip(_params(tmp_path / "two", 1), _params(tmp_path / "one", 1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_pmap_trains_two_processes_like_one(runs, tmp_path):
  """pmap over 2 processes x 2 devices (checkpoints every step) equals the 1 x 4 run, whose
  shard_map step keys dropout per device the same way."""
  _, _, single = runs
  env = dict(_env(), CPU_DEVICES_PER_PROCESS="2")
  launched = subprocess.run(["bash", "launch/local.sh", "2", *TINY, f"--workdir={tmp_path}",
                             "--config.train.num_steps=2", "--config.parallel.strategy=pmap"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert launched.returncode == 0, launched.stderr[-3000:]
  for a, b in zip(_params(tmp_path, 2), _params(single, 2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _predict(workdir, output, *launcher, env):
  return subprocess.run([*launcher, *PREDICT, f"--workdir={workdir}", "--mode=predict",
                         f"--input={workdir}/data/imagesTs", f"--output={output}",
                         "--probabilities"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
  """A tiny run trained for a few steps, and its test volumes predicted on one device: the
  reference (both in this process)."""
  workdir = tmp_path_factory.mktemp("predict")
  helpers.train(helpers.config(*PREDICT[1:], "--config.parallel.num_devices=2",
                                         "--config.train.num_steps=3"), str(workdir), False)
  helpers.predict(helpers.config(*PREDICT[1:], "--config.parallel.num_devices=1"), str(workdir),
                  f"{workdir}/data/imagesTs", str(workdir / "one"), probabilities=True)
  return workdir


@pytest.mark.parametrize("devices", [1, 2])
def test_two_processes_predict_what_one_process_predicts(predicted, tmp_path, devices):
  """Each process feeds its own rows of each batch; process 0 writes the gathered result."""
  output = tmp_path / "two"
  launched = _predict(predicted, output, "bash", "launch/local.sh", "2",
                      env=dict(_env(), CPU_DEVICES_PER_PROCESS=str(devices)))
  assert launched.returncode == 0, launched.stderr[-3000:]
  helpers.assert_same_predictions(predicted / "one", output)


def _pair_command(workdir, port, process_id, *extra):
  return [sys.executable, "-m", "medseg_jax.main", *TINY, f"--workdir={workdir}",
          "--config.train.num_steps=100000", "--config.checkpoint.every_steps=0", *extra,
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={process_id}"]


def _start_pair(workdir, port, *extra):
  return [subprocess.Popen(_pair_command(workdir, port, i, *extra), cwd=REPO, env=_env(2),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


def _wait_for(path, procs, timeout=240):
  """Returns once `path` exists; fails (stopping `procs`) if process 0 ends first."""
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if time.time() > deadline or procs[0].poll() is not None:
      for p in procs:
        p.kill()
      pytest.fail(procs[0].communicate()[1][-2000:])
    time.sleep(0.02)


def _start_training_pair(workdir, *extra):
  """Two processes training "forever" in `workdir`; returns once both are training."""
  procs = _start_pair(workdir, _free_port(), *extra)
  _wait_for(workdir / "metrics.jsonl", procs)
  return procs


def _finish(procs, timeout=240):
  """Each process's stderr once it has ended."""
  try:
    return [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


@pytest.mark.parametrize("ask", ["SIGTERM", "request file"])
def test_sigterm_or_the_users_request_stops_both_after_the_same_step(tmp_path, ask):
  """The non-chief process alone gets SIGTERM, or the user writes the stop request file
  that process 0 polls (as the dashboard does); both checkpoint the same step, exit 0
  and record that they stopped."""
  procs = _start_training_pair(tmp_path)
  if ask == "SIGTERM":
    procs[1].send_signal(signal.SIGTERM)
  else:
    (tmp_path / "stop_request").write_text(json.dumps({"time": time.time()}))
  errors = _finish(procs)
  assert [p.returncode for p in procs] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
  steps = _steps(tmp_path)
  assert len(steps) == 1  # the checkpoint both wrote together after the agreed step
  if ask == "SIGTERM":
    assert "SIGTERM received: stopping after this step" in errors[1]
    assert f"Stopped by SIGTERM to process 1 after step {steps[0]}" in errors[0]
  else:
    assert f"Stopped by the user's stop request after step {steps[0]}" in errors[0]
    assert not (tmp_path / "stop_request").exists()  # acted on once, not at the next start
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.readlines()[-1])["step"] == steps[0]
  ends = [json.loads((tmp_path / "processes" / f"{i}.json").read_text())["end"]
          for i in range(2)]
  assert [(e["reason"], e["exit_code"]) for e in ends] == [("stopped", 0)] * 2
  assert f"after step {steps[0]}" in ends[0]["message"] and f"after step {steps[0]}" in ends[1]["message"]
  assert json.loads((tmp_path / "manifest.json").read_text())["end"]["reason"] == "stopped"


def test_a_stop_request_stops_both_processes_after_the_same_step(tmp_path):
  """Six stop requests, each asked by one process at a drawn step, while one process
  waits for every step's result and the other lets up to 60 steps queue up on the
  device (tests/stop_pair.py): both stop after the same step each time, and none waits
  forever for the other."""
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "tests/stop_pair.py", str(port), str(i), "6"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=180) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
  # Each line is one write; gloo's own messages to stdout may sit between (not inside) them.
  pattern = r"round (\d+): stopped after step (\d+) \(both: (\d+) (\d+)\)"
  rounds = [re.findall(pattern, out) for out, _ in outputs]
  assert len(rounds[0]) == len(rounds[1]) == 6, outputs[0][0] + outputs[1][0]
  for ours, theirs in zip(*rounds):
    assert ours == theirs and ours[1] == ours[2] == ours[3]


def test_unreachable_coordinator_is_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "medseg_jax.main", *TINY, f"--workdir={workdir}",
                         "--config.parallel.distributed_timeout_seconds=2",
                         f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2",
                         "--process_id=1"], cwd=REPO, env=_env(2), capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
  assert "cannot reach the coordinator" in proc.stderr and not workdir.exists()
