"""Crashes and preemption through real `medseg_jax.main` processes compared with an
uninterrupted run in this process; corrupt checkpoints, divergence, device-count changes and early
stopping through the training loop in this process."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import helpers
from helpers import REPO, checkpoint_arrays, env_with_devices
from medseg_jax.errors import MedsegError

# Dropout makes the rng matter; a plugin (helpers.signal_at) crashes or preempts a run at
# a chosen checkpoint.
RUN = ["--config=configs/quickstart.py", "--config.data.synthetic_volumes=6",
       "--config.data.synthetic_shape=(32, 32, 8)", "--config.data.slices_per_volume=0",
       "--config.data.image_size=32", "--config.model.depth=2",
       "--config.model.base_features=4", "--config.model.dropout=0.1",
       "--config.train.per_device_batch_size=2", "--config.train.eval_every_steps=0",
       "--config.checkpoint.every_steps=5", "--config.monitor.log_every_steps=1",
       "--config.monitor.enabled=False", "--config.data.preprocess_workers=1",
       "--config.parallel.num_devices=2"]
STEPS = 20


def _run(workdir, *extra):
  """`medseg_jax.main` with RUN and `extra` in a process of its own, on 2 of 8 devices as
  in this process (XLA:CPU's code for a step, and so its last bits, depends on how many
  devices the process has)."""
  return subprocess.run([sys.executable, "-m", "medseg_jax.main", *RUN,
                         f"--config.train.num_steps={STEPS}", f"--workdir={workdir}", *extra],
                        cwd=REPO, env=env_with_devices(8), capture_output=True, text=True,
                        timeout=600)


def _steps(workdir):
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _assert_same_state(workdir, reference, step=STEPS):
  """Parameters, optimizer state and step, bit for bit."""
  ours, theirs = checkpoint_arrays(workdir, step), checkpoint_arrays(reference, step)
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    assert a.dtype == b.dtype and np.array_equal(a, b)


def _train(workdir, *extra, devices=2, from_scratch=False):
  """The loop in this process, as `medseg_jax.main` runs it with RUN and `extra`."""
  cfg = helpers.config(*RUN[1:], f"--config.train.num_steps={STEPS}", *extra,
                       f"--config.parallel.num_devices={devices}")
  return helpers.train(cfg, workdir, from_scratch)


@pytest.fixture(scope="module")
def in_process_reference(tmp_path_factory):
  """An uninterrupted run of STEPS steps in this process: the reference of the runs
  below, in processes of their own or in this one."""
  workdir = str(tmp_path_factory.mktemp("in_process_reference"))
  _train(workdir)
  assert _steps(workdir)[-1] == STEPS
  return workdir


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_sigkill_then_restart_ends_bitwise_equal_to_an_uninterrupted_run(in_process_reference,
                                                                        tmp_path):
  workdir, kill = str(tmp_path / "run"), helpers.signal_at(tmp_path, "SIGKILL", 10)
  killed = _run(workdir, kill)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # mid-run
  assert STEPS not in _steps(workdir)
  restarted = _run(workdir, kill)  # the same command
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert "Resuming from checkpoint at step" in restarted.stderr
  _assert_same_state(workdir, in_process_reference)
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  expected = _records(in_process_reference)
  assert [r["loss"] for r in records] == [r["loss"] for r in expected]  # the same batches


def test_sigterm_checkpoints_exits_0_and_the_restart_continues(in_process_reference, tmp_path):
  workdir, term = str(tmp_path / "run"), helpers.signal_at(tmp_path, "SIGTERM", 5)
  stopped = _run(workdir, term)
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  # The signal came during step 5's checkpoint: the run stops after the next step.
  assert "Stopped by SIGTERM after step 6" in stopped.stderr
  assert _steps(workdir) == [5, 6]
  assert not os.path.exists(os.path.join(workdir, "eval", "test_metrics.json"))
  restarted = _run(workdir, term)
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert "Resuming from checkpoint at step 6" in restarted.stderr
  _assert_same_state(workdir, in_process_reference)


def _truncate(workdir, step):
  data = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "d", "*"),
                   recursive=True)
  assert data
  for path in data:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)




@pytest.fixture
def logs(caplog):
  caplog.set_level("INFO")
  return caplog


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(in_process_reference,
                                                                   tmp_path, logs):
  workdir = str(tmp_path / "run")
  shutil.copytree(in_process_reference, workdir)
  _truncate(workdir, STEPS)
  _train(workdir)
  assert f"Skipping unreadable checkpoint {workdir}/checkpoints/{STEPS}" in logs.text
  assert "Resuming from checkpoint at step 15" in logs.text
  _assert_same_state(workdir, in_process_reference)


def test_no_readable_checkpoint_refuses_to_start_over_without_the_flag(in_process_reference,
                                                                      tmp_path, logs):
  workdir = str(tmp_path / "run")
  shutil.copytree(in_process_reference, workdir)
  for step in _steps(workdir):
    _truncate(workdir, step)
  with pytest.raises(MedsegError) as error:
    _train(workdir)
  message = str(error.value)
  assert error.value.exit_code == 1 and len(message.splitlines()) == 1
  assert "none of the checkpoints [10, 15, 20] can be read" in message
  assert "--from_scratch" in message
  logs.clear()
  _train(workdir, from_scratch=True)
  assert "Resuming" not in logs.text
  _assert_same_state(workdir, in_process_reference)


def test_divergence_stops_naming_step_and_lr_and_keeps_the_good_checkpoints(
    in_process_reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(in_process_reference, workdir)
  with pytest.raises(MedsegError) as error:
    _train(workdir, "--config.optim.lr=1e8", "--config.train.num_steps=40")
  message = str(error.value)
  assert error.value.exit_code == 1 and len(message.splitlines()) == 1
  assert "training diverged at step" in message
  assert "(learning rate 2e+08)" in message  # 1e8 x 2: the linear rule at 2 devices
  assert "not finite" in message
  assert _steps(workdir) == [10, 15, 20]
  _assert_same_state(workdir, in_process_reference)


def test_an_8_device_checkpoint_continues_on_2_devices(tmp_path, logs):
  """Same loader position, step renumbered for the smaller global batch, LR rescaled."""
  workdir = str(tmp_path)
  epochs = ["--config.train.num_steps=0", "--config.train.num_epochs=2",
            "--config.checkpoint.every_steps=1"]
  _train(workdir, *epochs, devices=8)
  # 32 training slices: global batch 16 on 8 devices, 2 steps per epoch, 4 steps.
  assert _steps(workdir) == [2, 3, 4]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # lost in a crash after step 3
  _train(workdir, *epochs, devices=2)
  # Step 3 = epoch 1, 16 slices into it; with global batch 4 that is step 8 + 16 / 4.
  assert ("at step 3 saved on 8 devices (global batch 16) on 2 devices (global batch 4): "
          "continuing at step 12 of 16") in logs.text
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3, 13, 14, 15, 16]
  # Adam at 2e-3, linear scaling by the device count.
  assert [r["learning_rate"] for r in records] == pytest.approx([0.016] * 3 + [0.004] * 4)
  final = checkpoint_arrays(workdir, 16)
  counts = [a for a in final if a.shape == () and a.dtype.kind == "i"]
  assert counts and all(int(c) == 16 for c in counts)  # step and every optimizer counter


def test_a_longer_augmented_epoch_resumes_mid_epoch_bitwise_equal(tmp_path, logs):
  """Epochs of 44 draws from the 32 training slices, each draw augmented: a run that
  crashed after step 9 (36 draws into epoch 0, past one pass over the slices) and
  restarted ends as one that never stopped, bit for bit."""
  longer = ["--config.data.augment.enabled=True", "--config.data.augment.samples_per_epoch=44",
            "--config.train.num_steps=13", "--config.checkpoint.every_steps=9"]
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
  _train(reference, *longer)
  # Global batch 4 on 2 devices: 44 / 4 = 11 steps per epoch, so step 13 is in epoch 1.
  assert "11 steps per epoch (44 slices drawn per epoch), 13 steps" in logs.text
  with open(os.path.join(reference, "data_info.json")) as f:
    assert json.load(f)["samples_per_epoch"] == 44
  assert _steps(reference) == [9, 13]
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "13"))  # lost in a crash after step 9
  logs.clear()
  _train(workdir, *longer)
  assert "Resuming from checkpoint at step 9 (epoch 0, 36 slices into its order)" in logs.text
  _assert_same_state(workdir, reference, step=13)


def test_early_stopping_ends_a_plateau_and_stays_finished(tmp_path, logs):
  workdir = str(tmp_path)
  args = ["--config.optim.lr=0", "--config.train.eval_every_steps=1",
          "--config.train.early_stopping_patience=2"]
  _train(workdir, *args)
  # Nothing changes at LR 0: the best Dice is step 1's, two validations later it stops.
  assert "Early stopping at step 3: no better validation Dice since step 1" in logs.text
  assert _steps(workdir) == [1, 3]  # the best (kept for its Dice) and the last
  with open(os.path.join(workdir, "eval", "test_metrics.json")) as f:
    assert json.load(f)["step"] == 1
  logs.clear()
  _train(workdir, *args)
  assert "Resuming from checkpoint at step 3" in logs.text
  assert _steps(workdir) == [1, 3]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
